"""Hot-swap under traffic: register, use, re-register and unregister a task while other traffic streams."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import grpc
import pytest

from helpers import hf_greedy, image_prompt, make_lora_bundle, peft_model, png_bytes
from server_process import ADMIN_TOKEN

MAX_TOKENS = 8
QUESTION = "Describe the image."


@pytest.fixture(scope="module")
def bundles(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    return {
        "a": make_lora_bundle(tiny_base, root / "a", name="swap-a", seed=101),
        "b1": make_lora_bundle(tiny_base, root / "b1", name="swap-b", seed=102),
        "b2": make_lora_bundle(tiny_base, root / "b2", name="swap-b", seed=103),
    }


@pytest.fixture(scope="module")
def refs(tiny_base, hf_processor, sample_images, bundles):
    import torch
    from transformers import LlavaForConditionalGeneration

    prompt, image = image_prompt(QUESTION), sample_images[2]
    base = LlavaForConditionalGeneration.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    out = {"base": hf_greedy(base, hf_processor, prompt, image, MAX_TOKENS)}
    for key, bundle in bundles.items():
        out[key] = hf_greedy(peft_model(tiny_base, bundle), hf_processor, prompt, image, MAX_TOKENS)
    assert len({tuple(v) for v in out.values()}) == len(out), f"references must all differ: {out}"
    return out


def _engine_loras(server) -> list[int]:
    with urllib.request.urlopen(f"{server.http}/v1/engine", timeout=30) as resp:
        return json.loads(resp.read())["lora_adapter_ids"]


def test_hot_swap_under_traffic(server, bundles, refs, sample_images):
    from deltaserve.client.common import DeltaClientError
    from deltaserve.client.sync import DeltaClient

    image = png_bytes(sample_images[2])
    prompt = image_prompt(QUESTION)
    admin = DeltaClient(server.grpc, admin_token=ADMIN_TOKEN)
    admin.register(bundles["a"])
    loras_before = set(_engine_loras(server))

    stop = threading.Event()
    results: list[tuple[str, bool, str]] = []

    def traffic(task: str, expected: list[int]) -> None:
        with DeltaClient(server.grpc) as client:
            while not stop.is_set():
                try:
                    chunks = list(
                        client.generate_stream(prompt, image=image, task=task, max_tokens=MAX_TOKENS, temperature=0)
                    )
                    got = [t for c in chunks for t in c.token_ids]
                    results.append((task, got == expected, f"{got} != {expected}" if got != expected else ""))
                except Exception as exc:  # every failure counts against the test
                    results.append((task, False, repr(exc)))

    threads = [
        threading.Thread(target=traffic, args=(server.base_name, refs["base"])),
        threading.Thread(target=traffic, args=("swap-a", refs["a"])),
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        info = admin.register(bundles["b1"])
        assert info.name == "swap-b"
        assert (
            admin.generate(prompt, image=image, task="swap-b", max_tokens=MAX_TOKENS, temperature=0).token_ids
            == refs["b1"]
        )
        loras_with_b1 = set(_engine_loras(server))

        info2 = admin.register(bundles["b2"])  # same name, new weights
        assert info2.content_digest != info.content_digest
        for _ in range(3):
            assert (
                admin.generate(prompt, image=image, task="swap-b", max_tokens=MAX_TOKENS, temperature=0).token_ids
                == refs["b2"]
            )

        admin.unregister("swap-b")
        with pytest.raises(DeltaClientError) as err:
            admin.generate(prompt, image=image, task="swap-b", max_tokens=MAX_TOKENS)
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    # Unregister really removed B from vLLM: only what was loaded before B remains.
    assert len(loras_with_b1) == len(loras_before) + 1
    deadline = time.monotonic() + 30
    while set(_engine_loras(server)) != loras_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert set(_engine_loras(server)) == loras_before

    failures = [r for r in results if not r[1]]
    assert not failures, failures[:5]
    per_task = {task: sum(1 for r in results if r[0] == task) for task in (server.base_name, "swap-a")}
    assert all(n >= 3 for n in per_task.values()), per_task
    admin.unregister("swap-a")
    admin.close()


def test_base_rows_stay_base_when_every_lora_slot_is_full(server, tiny_base, hf_processor, sample_images, tmp_path):
    """Base requests batched with LoRA requests while all ``max_loras`` adapter slots are
    resident. vLLM's CPU LoRA ops gathered slot ``-1`` (the last one) for base rows; see
    ``server/vllm_fixes.py``. Fails without that fix."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from deltaserve.client.sync import DeltaClient

    slots = 4  # ServeConfig.max_loras default, the server fixture's setting
    prompt, image = image_prompt(QUESTION), png_bytes(sample_images[1])
    base = LlavaForConditionalGeneration.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    expected = {server.base_name: hf_greedy(base, hf_processor, prompt, sample_images[1], MAX_TOKENS)}
    names = [f"slot-{i}" for i in range(slots)]
    admin = DeltaClient(server.grpc, admin_token=ADMIN_TOKEN)
    try:
        for i, name in enumerate(names):
            bundle = make_lora_bundle(tiny_base, tmp_path / name, name=name, seed=300 + i)
            expected[name] = hf_greedy(
                peft_model(tiny_base, bundle), hf_processor, prompt, sample_images[1], MAX_TOKENS
            )
            admin.register(bundle)
        # Negative control: a base row served with a slot's adapter must give a different answer,
        # or the check below could not see the bug it is about.
        assert all(expected[name] != expected[server.base_name] for name in names), expected
        results: list[tuple[str, list[int]]] = []

        def traffic(task: str) -> None:
            with DeltaClient(server.grpc) as client:
                for _ in range(6):
                    results.append(
                        (
                            task,
                            list(
                                client.generate(
                                    prompt, image=image, task=task, max_tokens=MAX_TOKENS, temperature=0
                                ).token_ids
                            ),
                        )
                    )

        threads = [
            threading.Thread(target=traffic, args=(task,))
            for task in expected
            for _ in range(2 if task == server.base_name else 1)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        wrong = [(task, got) for task, got in results if got != expected[task]]
        assert len(results) == 6 * (slots + 2) and not wrong, f"{len(wrong)} of {len(results)} wrong: {wrong[:3]}"
    finally:
        for name in names:
            try:
                admin.unregister(name)
            except Exception:
                pass
        admin.close()
