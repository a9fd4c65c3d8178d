"""A third-party delta kind, served concurrently and exactly with no edit in ``server/``.

The IA³ kind (``tests/kinds/deltaserve_ia3``) is installed in the session server only
through its ``deltaserve.plugins`` entry point. Its bundle rescales ``k_proj`` and ``v_proj``
outputs (``k_proj`` lives inside vLLM's fused ``qkv_proj``) and the ``down_proj`` input of the
last two decoder layers. The reference is PEFT's own IA³ on the transformers model — an
independent implementation, not the kind's ``apply``.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from helpers import PROMPTS, hf_greedy, image_prompt, png_bytes
from server_process import ADMIN_TOKEN

MAX_TOKENS = 8
NAME = "ia3-task"
SERVER = Path(__file__).resolve().parents[2] / "server"
BUILT_IN = ("lora", "sparse", "bottleneck")


def _modules(tiny_base) -> tuple[list[str], list[str]]:
    from deltaserve.plugins.base_spec import BaseSpec

    shapes = BaseSpec.from_dir(tiny_base).module_shapes()
    layers = sorted({int(m.split(".layers.")[1].split(".")[0]) for m in shapes if ".layers." in m and "language" in m})
    modules = [
        m
        for m in shapes
        if m.startswith("language_model.")
        and any(f".layers.{i}." in m for i in layers[-2:])
        and m.rsplit(".", 1)[-1] in ("k_proj", "v_proj", "down_proj")
    ]
    return sorted(modules), sorted(m for m in modules if m.endswith("down_proj"))


@pytest.fixture(scope="module")
def ia3(tiny_base, tmp_path_factory):
    """(bundle path, module → vector, feed-forward modules)."""
    import torch

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.writer import write_bundle

    modules, feedforward = _modules(tiny_base)
    shapes = BaseSpec.from_dir(tiny_base).module_shapes()
    gen = torch.Generator().manual_seed(7)
    vectors = {
        m: 1 + 0.9 * torch.randn(shapes[m][1] if m in feedforward else shapes[m][0], generator=gen) for m in modules
    }
    path = write_bundle(
        tmp_path_factory.mktemp("ia3") / "bundle",
        name=NAME,
        kind="ia3",
        base=BaseSpec.from_dir(tiny_base),
        config={"modules": modules, "feedforward": feedforward},
        files={"ia3.safetensors": {f"{m}.ia3_l": v for m, v in vectors.items()}},
        validate=False,  # the kind is installed in the server, not in this process
    )
    return path, vectors, feedforward


@pytest.fixture(scope="module")
def refs(tiny_base, hf_processor, sample_images, ia3):
    import torch
    from peft import IA3Config, get_peft_model
    from transformers import LlavaForConditionalGeneration

    from deltaserve.plugins.naming import checkpoint_to_module

    _, vectors, feedforward = ia3

    def model():
        return LlavaForConditionalGeneration.from_pretrained(str(tiny_base), dtype=torch.float32).eval()

    base = model()
    config = IA3Config(
        target_modules=[checkpoint_to_module(m) for m in vectors],
        feedforward_modules=[checkpoint_to_module(m) for m in feedforward],
    )
    tuned = get_peft_model(model(), config)
    by_module = {checkpoint_to_module(m): v for m, v in vectors.items()}
    loaded = 0
    for name, module in tuned.named_modules():
        key = re.sub(r"^base_model\.model\.", "", name)
        if hasattr(module, "ia3_l") and key in by_module:
            with torch.no_grad():
                module.ia3_l["default"].copy_(by_module[key].reshape(module.ia3_l["default"].shape))
            loaded += 1
    assert loaded == len(vectors)
    out = {}
    for task, m in (("base", base), (NAME, tuned)):
        out[task] = [
            hf_greedy(m, hf_processor, image_prompt(q), sample_images[i], MAX_TOKENS) for i, q in enumerate(PROMPTS)
        ]
    assert out[NAME] != out["base"] and len({tuple(o) for o in out[NAME]}) == len(PROMPTS)
    return out


def test_server_names_no_built_in_kind():
    """The server drives kinds through their declarations only: no built-in kind name appears in its code."""
    found = []
    for file in sorted(SERVER.glob("*.py")):
        for n, line in enumerate(file.read_text().splitlines(), 1):
            if any(f'"{kind}"' in line or f"'{kind}'" in line or f"plugins.{kind}" in line for kind in BUILT_IN):
                found.append(f"{file.name}:{n}: {line.strip()}")
    assert not found, found


def test_a_third_party_kind_is_served_concurrently_and_exactly(server, ia3, refs, sample_images):
    from deltaserve.client.aio import AsyncDeltaClient
    from deltaserve.client.sync import DeltaClient

    with DeltaClient(server.grpc, admin_token=ADMIN_TOKEN) as admin:
        info = admin.register(ia3[0])
    try:
        assert (info.kind, info.binding) == ("ia3", "concurrent")
        images = [png_bytes(img) for img in sample_images[: len(PROMPTS)]]

        async def load():
            async with AsyncDeltaClient(server.grpc) as client:

                async def one(task, i):
                    out = await client.generate(
                        image_prompt(PROMPTS[i]),
                        image=images[i],
                        task=server.base_name if task == "base" else task,
                        max_tokens=MAX_TOKENS,
                        temperature=0,
                    )
                    return task, i, out.token_ids

                jobs = [(task, k % len(PROMPTS)) for k in range(40) for task in ("base", NAME)]
                return await asyncio.gather(*(one(t, i) for t, i in jobs))

        results = asyncio.run(load())
        wrong = [(t, i, got) for t, i, got in results if got != refs[t][i]]
        assert not wrong, f"{len(wrong)} of {len(results)} differ, e.g. {wrong[:2]}"
    finally:
        with DeltaClient(server.grpc, admin_token=ADMIN_TOKEN) as admin:
            admin.unregister(NAME)
