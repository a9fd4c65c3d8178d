"""Plan deltas (sparse, bottleneck) on the shared server: exactness, switching, mixed load, fairness, hot-register, auto routing.

Both serving modes run here: the bottleneck delta and ``ex-sparse-c`` (decoder, projector and
vision-tower weights) share the batch with base and LoRA traffic; ``ex-sparse`` also changes the
LM head, which no per-row computation serves, so the policy gives it an exclusive engine state.

References are computed with transformers and the delta applied through its plugin
(sparse, bottleneck) or PEFT (LoRA), so "the output its expert gives alone" is an
independent implementation, not the server's own earlier answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
import urllib.request

import grpc
import pytest

from helpers import (
    PROMPTS,
    SPARSE_PARAMS,
    hf_greedy,
    image_prompt,
    make_bottleneck_bundle,
    make_lora_bundle,
    make_sparse_bundle,
    peft_model,
    plugin_model,
    png_bytes,
)
from server_process import ADMIN_TOKEN

MAX_TOKENS = 8
SPARSE, BOTTLENECK, LORA_A, LORA_B = "ex-sparse", "ex-bottleneck", "ex-lora-a", "ex-lora-b"
SPARSE_C = "ex-sparse-c"
"""A sparse delta on decoder layers, the projector and the vision tower: served in the shared batch."""
PIRATE = [
    "Translate to pirate speak: hello there",
    "Translate to pirate speak: where is the ship",
    "Translate to pirate speak: good day",
]


@pytest.fixture(scope="module")
def bundles(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("exclusive")
    return {
        SPARSE: make_sparse_bundle(
            tiny_base, root / "sparse", SPARSE, seed=11, description="pirate translation", examples=PIRATE
        ),
        BOTTLENECK: make_bottleneck_bundle(tiny_base, root / "bottleneck", BOTTLENECK, seed=12),
        SPARSE_C: make_sparse_bundle(
            tiny_base,
            root / "sparse-c",
            SPARSE_C,
            seed=16,
            params=[p for p in SPARSE_PARAMS if "lm_head" not in p],
        ),
        LORA_A: make_lora_bundle(tiny_base, root / "lora-a", name=LORA_A, seed=13),
        LORA_B: make_lora_bundle(tiny_base, root / "lora-b", name=LORA_B, seed=14),
        "hot-sparse": make_sparse_bundle(tiny_base, root / "hot", "hot-sparse", seed=15),
    }


@pytest.fixture(scope="module")
def refs(tiny_base, hf_processor, sample_images, bundles):
    """expert → greedy tokens for each of PROMPTS (with image i)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    models = {"base": LlavaForConditionalGeneration.from_pretrained(str(tiny_base), dtype=torch.float32).eval()}
    for name, bundle in bundles.items():
        models[name] = peft_model(tiny_base, bundle) if name.startswith("ex-lora") else plugin_model(tiny_base, bundle)
    out = {
        name: [
            hf_greedy(model, hf_processor, image_prompt(q), sample_images[i], MAX_TOKENS) for i, q in enumerate(PROMPTS)
        ]
        for name, model in models.items()
    }
    for name, outputs in out.items():  # non-degenerate: a delta that changes nothing proves nothing
        assert len({tuple(o) for o in outputs}) == len(outputs), (
            f"{name} says the same thing to every prompt: {outputs}"
        )
        if name != "base":
            assert outputs != out["base"], f"{name} gives the base's outputs"
    return out


@pytest.fixture(scope="module")
def registered(server, bundles):
    from deltaserve.client.sync import DeltaClient

    with DeltaClient(server.grpc, admin_token=ADMIN_TOKEN) as admin:
        for name in (SPARSE, BOTTLENECK, LORA_A, LORA_B, SPARSE_C):
            info = admin.register(bundles[name])
            assert info.name == name
    return server


def test_the_policy_serves_what_it_can_in_the_shared_batch(registered):
    listed = {d["name"]: d for d in _http_json(registered, "/v1/deltas")["deltas"]}
    modes = {name: listed[name]["binding"] for name in (SPARSE, SPARSE_C, BOTTLENECK, LORA_A)}
    assert modes == {SPARSE: "exclusive", SPARSE_C: "concurrent", BOTTLENECK: "concurrent", LORA_A: "concurrent"}
    assert "LM head" in listed[SPARSE]["serving"]["reason"], listed[SPARSE]["serving"]
    concurrent = listed[SPARSE_C]["serving"]
    assert "multi_modal_projector.linear_2" in concurrent["layers"], concurrent  # the projector, per image
    assert any("vision_tower" in layer for layer in concurrent["layers"]), concurrent
    assert 0 < concurrent["resident_bytes"] < 8 * 2**20


def _expert(server, task: str) -> str:
    return server.base_name if task == "base" else task


def _http_json(server, path: str, method: str = "GET", token: str | None = None) -> dict:
    req = urllib.request.Request(f"{server.http}{path}", method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def test_sparse_and_bottleneck_match_plugin_reference(registered, refs, sample_images):
    from deltaserve.client.sync import DeltaClient

    with DeltaClient(registered.grpc) as client:
        for task in (SPARSE, SPARSE_C, BOTTLENECK, "base"):
            for i, q in enumerate(PROMPTS):
                out = client.generate(
                    image_prompt(q),
                    image=png_bytes(sample_images[i]),
                    task=_expert(registered, task),
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                )
                assert out.token_ids == refs[task][i], f"{task}, prompt {i}"
                assert out.routing.expert == _expert(registered, task)


def test_a_delta_staged_while_another_state_is_active_is_built_from_the_base(registered, bundles, refs, sample_images):
    """Re-register the bottleneck (its down_proj layers overlap the sparse delta's) while the engine sits in the
    sparse state: it must still answer exactly as its reference. Before the fix the adapter wrapped the sparse
    state's patched layer (bench/soak.py: 29 wrong bottleneck answers in 10 minutes of churn)."""
    from deltaserve.client.sync import DeltaClient

    image, prompt = png_bytes(sample_images[0]), image_prompt(PROMPTS[0])
    with DeltaClient(registered.grpc, admin_token=ADMIN_TOKEN) as client:
        assert (
            client.generate(prompt, image=image, task=SPARSE, max_tokens=MAX_TOKENS, temperature=0).token_ids
            == refs[SPARSE][0]
        )
        assert _http_json(registered, "/v1/engine")["state"].startswith(SPARSE)  # the engine stays in the sparse state
        client.unregister(BOTTLENECK)
        client.register(bundles[BOTTLENECK])
        for i, q in enumerate(PROMPTS):
            out = client.generate(
                image_prompt(q),
                image=png_bytes(sample_images[i]),
                task=BOTTLENECK,
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
            assert out.token_ids == refs[BOTTLENECK][i], f"prompt {i}"
        base = client.generate(prompt, image=image, task=registered.base_name, max_tokens=MAX_TOKENS, temperature=0)
        assert base.token_ids == refs["base"][0]  # the base is untouched, and the engine leaves in the base state


def test_alternating_switches_restore_the_base_exactly(registered, refs, sample_images):
    from deltaserve.client.sync import DeltaClient

    image, prompt = png_bytes(sample_images[0]), image_prompt(PROMPTS[0])
    before = _http_json(registered, "/v1/engine")["state_switches"]
    with DeltaClient(registered.grpc) as client:
        for k in range(50):
            task = SPARSE if k % 2 == 0 else BOTTLENECK
            out = client.generate(prompt, image=image, task=task, max_tokens=MAX_TOKENS, temperature=0)
            assert out.token_ids == refs[task][0], f"switch {k} into {task}"
    assert _http_json(registered, "/v1/engine")["state_switches"] - before >= 50
    verified = _http_json(registered, "/v1/engine/verify", "POST", ADMIN_TOKEN)
    assert verified["match"], f"live base weights differ from the checkpoint: {verified['mismatched']}"
    assert verified["tensors"] >= 70  # every tensor vLLM holds was read back, not a sample
    with DeltaClient(registered.grpc) as client:
        for i, q in enumerate(PROMPTS):
            out = client.generate(
                image_prompt(q),
                image=png_bytes(sample_images[i]),
                task=registered.base_name,
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
            assert out.token_ids == refs["base"][i]


def test_verify_needs_the_admin_token(registered):
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as exc:
        _http_json(registered, "/v1/engine/verify", "POST")
    assert exc.value.code == 401


def test_verify_reports_a_weight_that_differs(registered, tiny_base, tmp_path):
    """Negative control of the check above: verify compares what the engine computes with against
    the checkpoint files, so with one checkpoint tensor changed on disk after the engine loaded it,
    exactly that tensor must be reported. (The shared base is put back before anything else runs;
    the change is a new file, so nothing already mapped from the old one sees it.)"""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    checkpoint = tiny_base / "model.safetensors"
    original, changed = tmp_path / "original.safetensors", tmp_path / "changed.safetensors"
    shutil.copy2(checkpoint, original)
    tensors = load_file(checkpoint)
    with safe_open(str(checkpoint), "pt") as f:
        metadata = f.metadata()
    name = next(n for n in sorted(tensors) if n.endswith("layers.0.self_attn.q_proj.weight"))  # fused in vLLM
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(changed), metadata=metadata)
    try:
        os.replace(changed, checkpoint)
        verified = _http_json(registered, "/v1/engine/verify", "POST", ADMIN_TOKEN)
    finally:
        os.replace(original, checkpoint)
    assert not verified["match"] and verified["mismatched"] == [name], verified
    assert _http_json(registered, "/v1/engine/verify", "POST", ADMIN_TOKEN)["match"]


async def _mixed_load(server, jobs, sample_images):
    from deltaserve.client.aio import AsyncDeltaClient

    images = [png_bytes(img) for img in sample_images[: len(PROMPTS)]]
    async with AsyncDeltaClient(server.grpc) as client:

        async def one(task: str, i: int):
            try:
                out = await client.generate(
                    image_prompt(PROMPTS[i]),
                    image=images[i],
                    task=_expert(server, task),
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                )
                return task, i, out.token_ids
            except Exception as exc:  # every failure counts against the test
                return task, i, exc

        started = time.perf_counter()
        results = await asyncio.gather(*(one(task, i) for task, i in jobs))
        return results, time.perf_counter() - started


def test_mixed_concurrent_load(registered, refs, sample_images):
    tasks = ["base", LORA_A, LORA_B, SPARSE_C, BOTTLENECK, SPARSE]
    jobs = [(tasks[k % len(tasks)], (k // len(tasks)) % len(PROMPTS)) for k in range(300)]
    results, mixed_s = asyncio.run(_mixed_load(registered, jobs, sample_images))
    failures = [(t, i, got) for t, i, got in results if got != refs[t][i]]
    assert not failures, f"{len(failures)} of 300 requests failed or differ, e.g. {failures[:3]}"
    base_results, base_s = asyncio.run(
        _mixed_load(registered, [("base", k % len(PROMPTS)) for k in range(300)], sample_images)
    )
    assert all(got == refs["base"][i] for _, i, got in base_results)
    print(
        f"\n300 mixed requests: {mixed_s:.1f} s; 300 base-only: {base_s:.1f} s; mixed/base throughput {base_s / mixed_s:.2f}"
    )


def test_exclusive_request_is_served_within_the_bound_under_base_traffic(registered, refs, sample_images):
    """A continuous stream of base traffic must not starve an exclusive task (``--max-state-wait``, 2 s here)."""
    from deltaserve.client.sync import DeltaClient

    bound_s = 2.0 + 8.0  # max_wait + drain of running base requests + a switch + its own generation, generously
    stop = threading.Event()
    base_done: list[float] = []
    errors: list[str] = []

    def base_traffic(i: int) -> None:
        with DeltaClient(registered.grpc) as client:
            while not stop.is_set():
                try:
                    out = client.generate(
                        image_prompt(PROMPTS[i]),
                        image=png_bytes(sample_images[i]),
                        task=registered.base_name,
                        max_tokens=16,
                        temperature=0,
                    )
                    assert out.token_ids[:MAX_TOKENS] == refs["base"][i]
                    base_done.append(time.monotonic())
                except Exception as exc:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=base_traffic, args=(i % len(PROMPTS),)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        assert base_done, "base traffic did not start"
        with DeltaClient(registered.grpc) as client:
            started = time.monotonic()
            out = client.generate(
                image_prompt(PROMPTS[1]),
                image=png_bytes(sample_images[1]),
                task=SPARSE,
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
            finished = time.monotonic()
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert out.token_ids == refs[SPARSE][1]
    assert finished - started <= bound_s, (
        f"the exclusive request waited {finished - started:.1f} s under base traffic (bound {bound_s} s)"
    )
    assert any(t > finished for t in base_done), (
        "base traffic stopped before the exclusive request was served: fairness not exercised"
    )
    assert not errors, errors[:3]


def test_hot_register_sparse_under_traffic(registered, bundles, refs, sample_images):
    from deltaserve.client.common import DeltaClientError
    from deltaserve.client.sync import DeltaClient

    stop = threading.Event()
    results: list[tuple[str, bool, str]] = []

    def traffic(task: str, i: int) -> None:
        with DeltaClient(registered.grpc) as client:
            while not stop.is_set():
                try:
                    out = client.generate(
                        image_prompt(PROMPTS[i]),
                        image=png_bytes(sample_images[i]),
                        task=_expert(registered, task),
                        max_tokens=MAX_TOKENS,
                        temperature=0,
                    )
                    results.append((task, out.token_ids == refs[task][i], str(out.token_ids)))
                except Exception as exc:
                    results.append((task, False, repr(exc)))

    threads = [threading.Thread(target=traffic, args=(task, i)) for i, task in enumerate(("base", LORA_A, BOTTLENECK))]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        with DeltaClient(registered.grpc, admin_token=ADMIN_TOKEN) as admin:
            info = admin.register(bundles["hot-sparse"])
            assert info.kind == "sparse"
            for i, q in enumerate(PROMPTS):
                out = admin.generate(
                    image_prompt(q),
                    image=png_bytes(sample_images[i]),
                    task="hot-sparse",
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                )
                assert out.token_ids == refs["hot-sparse"][i]
            admin.unregister("hot-sparse")
            with pytest.raises(DeltaClientError) as exc:
                admin.generate("Hello", task="hot-sparse", max_tokens=2)
            assert exc.value.code == grpc.StatusCode.NOT_FOUND
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failed = [r for r in results if not r[1]]
    assert results and not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:3]}"
    assert {r[0] for r in results} == {"base", LORA_A, BOTTLENECK}


def test_auto_routing_reports_its_decision(registered, refs):
    from deltaserve.client.sync import DeltaClient

    with DeltaClient(registered.grpc) as client:
        routed = client.generate("Translate to pirate speak: where is the treasure", max_tokens=4, temperature=0)
        assert routed.routing.router == "auto" and routed.routing.expert == SPARSE, routed.routing
        assert routed.routing.score > 0 and routed.routing.reason
        explicit = client.generate(
            "Translate to pirate speak: where is the treasure", task=SPARSE, max_tokens=4, temperature=0
        )
        assert routed.token_ids == explicit.token_ids
        open_world = client.generate(
            "The quick brown fox jumps over the lazy dog", task="auto", max_tokens=4, temperature=0
        )
        assert open_world.routing.expert == registered.base_name, open_world.routing
        assert "open world" in open_world.routing.reason or "below" in open_world.routing.reason
    with urllib.request.urlopen(f"{registered.http}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    assert f'deltaserve_routing_decisions_total{{expert="{SPARSE}",router="auto"}}' in text
    assert "deltaserve_state_switches_total" in text
