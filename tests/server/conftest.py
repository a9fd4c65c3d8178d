"""One session-wide ``deltaserve serve`` (admin token ``ADMIN_TOKEN``).

Tests that must stop, restart or kill a server start their own :class:`ServerProcess`.
The session server also has a third-party delta kind installed: ``tests/kinds`` (the IA³
kind and its ``deltaserve.plugins`` entry point) is on its ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from helpers import IA3_NAME, PROMPTS, TUNED_TOKENS, hf_greedy, hf_model_of, image_prompt, peft_model, plugin_model
from server_process import ServerProcess

THIRD_PARTY_KINDS = Path(__file__).resolve().parents[1] / "kinds"


@pytest.fixture(scope="session")
def kinds_env() -> dict:
    """Environment for a test server with the third-party kinds of ``tests/kinds`` importable."""
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(THIRD_PARTY_KINDS), os.environ.get("PYTHONPATH")) if p)}


@pytest.fixture(scope="session")
def server(tiny_base, tmp_path_factory, kinds_env):
    srv = ServerProcess(tiny_base, tmp_path_factory.mktemp("server") / "store", env=kinds_env)
    yield srv
    srv.stop()


TUNED_METHODS = {
    "t-spider": ("spider", 0),
    "t-magnitude": ("magnitude", 0),
    "t-full": ("full", 0),
    "t-lora-a": ("lora", 1),
    "t-lora-b": ("lora", 2),
    "t-bottleneck": ("bottleneck", 0),
}
QWEN_TUNED_METHODS = {
    "q-spider": ("spider", 0),
    "q-magnitude": ("magnitude", 0),
    "q-full": ("full", 0),
    "q-lora": ("lora", 1),
    "q-bottleneck": ("bottleneck", 0),
}
"""The Qwen2-VL deltas: every kind (sparse by the three selective methods: SPIDER, magnitude, full), one LoRA."""


def tune_deltas(base: Path, root: Path, methods: dict[str, tuple[str, int]]) -> dict[str, Path]:
    """Deltas made by ``deltaserve tune`` with its defaults, briefly trained (30 steps of 8) on the tiny world's
    digits: SPIDER and magnitude masks and full (dense) fine-tuning over the projector and the last two decoder
    layers (RMSNorm weights included), LoRA on every linear of that scope, bottleneck relu adapters on ``o_proj`` and ``down_proj``.
    ``methods``: name → (method, seed). Name → bundle directory."""
    from deltaserve.tuning.tune import TuneConfig, tune
    from deltaserve.tuning.world import WorldConfig, build_world

    world = build_world(root / "world", WorldConfig(downstream_train=96, val=4, test=4), tasks=("digits",))
    out = {}
    for name, (method, seed) in methods.items():
        config = TuneConfig(steps=30, batch_size=8, examples=3, seed=seed, eval_limit=4)
        result = tune(
            base, world["digits"], method, root / name, config, name=name, evaluate_general=False, progress=False
        )
        out[name] = result.path
    return out


def tuned_references(base: Path, images: list, tuned: dict[str, Path], methods: dict) -> dict[str, list[list[int]]]:
    """Per task (``base`` and each tuned delta), transformers' greedy tokens (``TUNED_TOKENS``, as many forced)
    for each of ``PROMPTS`` with its image, in the base's prompt format: PEFT for LoRA, the other kinds applied
    through their plugin. Checked non-degenerate: distinct across prompts, and each delta's not the base's."""
    import json

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(base))
    model_type = json.loads((base / "config.json").read_text())["model_type"]
    models = {"base": hf_model_of(base)}
    for name, path in tuned.items():
        models[name] = peft_model(base, path) if methods[name][0] == "lora" else plugin_model(base, path)
    out = {
        name: [
            hf_greedy(m, processor, image_prompt(q, model_type), images[i], TUNED_TOKENS, TUNED_TOKENS)
            for i, q in enumerate(PROMPTS)
        ]
        for name, m in models.items()
    }
    for name, outputs in out.items():
        assert len({tuple(o) for o in outputs}) == len(outputs), (name, outputs)
        assert name == "base" or outputs != out["base"], f"{name} gives the base's outputs"
    return out


@pytest.fixture(scope="session")
def tuned(tiny_base, tmp_path_factory):
    """:func:`tune_deltas` of ``TUNED_METHODS`` on the tiny LLaVA base. Name → bundle directory."""
    return tune_deltas(tiny_base, tmp_path_factory.mktemp("tuned"), TUNED_METHODS)


@pytest.fixture(scope="session")
def tuned_refs(tiny_base, sample_images, tuned):
    """:func:`tuned_references` of the LLaVA deltas."""
    return tuned_references(tiny_base, sample_images, tuned, TUNED_METHODS)


@pytest.fixture(scope="session")
def qwen_tuned(tiny_qwen_base, tmp_path_factory):
    """:func:`tune_deltas` of ``QWEN_TUNED_METHODS`` on the tiny Qwen2-VL base (the merger is its projector)."""
    return tune_deltas(tiny_qwen_base, tmp_path_factory.mktemp("qwen-tuned"), QWEN_TUNED_METHODS)


QWEN_HUB_TUNED_METHODS = {"h-spider": ("spider", 0), "h-lora": ("lora", 1), "h-bottleneck": ("bottleneck", 0)}
"""The deltas on the hub-layout Qwen2-VL base: one per kind."""


@pytest.fixture(scope="session")
def qwen_hub_tuned(tiny_qwen_hub_base, tmp_path_factory):
    """:func:`tune_deltas` of ``QWEN_HUB_TUNED_METHODS`` on the hub-layout Qwen2-VL base; their bundles name its
    tensors as it does (``visual.*``, ``model.layers.*``)."""
    return tune_deltas(tiny_qwen_hub_base, tmp_path_factory.mktemp("qwen-hub-tuned"), QWEN_HUB_TUNED_METHODS)


@pytest.fixture(scope="session")
def qwen_hub_tuned_refs(tiny_qwen_hub_base, sample_images, qwen_hub_tuned):
    """:func:`tuned_references` of the hub-layout Qwen2-VL deltas."""
    return tuned_references(tiny_qwen_hub_base, sample_images, qwen_hub_tuned, QWEN_HUB_TUNED_METHODS)


@pytest.fixture(scope="session")
def qwen_tuned_refs(tiny_qwen_base, sample_images, qwen_tuned):
    """:func:`tuned_references` of the Qwen2-VL deltas."""
    return tuned_references(tiny_qwen_base, sample_images, qwen_tuned, QWEN_TUNED_METHODS)


def _modules(base: Path) -> tuple[list[str], list[str]]:
    """``k_proj``, ``v_proj`` and ``down_proj`` of the last two decoder layers (checkpoint names), and the
    feed-forward ones among them."""
    from deltaserve.plugins.base_spec import BaseSpec

    spec = BaseSpec.from_dir(base)
    prefix = spec.family.decoder_layers_checkpoint
    shapes = spec.module_shapes()
    layers = sorted({int(m[len(prefix) :].split(".")[0]) for m in shapes if m.startswith(prefix)})
    modules = [
        m
        for m in shapes
        if any(m.startswith(f"{prefix}{i}.") for i in layers[-2:])
        and m.rsplit(".", 1)[-1] in ("k_proj", "v_proj", "down_proj")
    ]
    return sorted(modules), sorted(m for m in modules if m.endswith("down_proj"))


def ia3_bundle(base: Path, root: Path):
    """An IA³ bundle (the third-party kind of ``tests/kinds``) for ``base``: rescales ``k_proj``/``v_proj``
    outputs and the ``down_proj`` input of the last two decoder layers. (bundle path, module → vector,
    feed-forward modules)."""
    import torch

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.writer import write_bundle

    modules, feedforward = _modules(base)
    shapes = BaseSpec.from_dir(base).module_shapes()
    gen = torch.Generator().manual_seed(7)
    vectors = {
        m: 1 + 0.9 * torch.randn(shapes[m][1] if m in feedforward else shapes[m][0], generator=gen) for m in modules
    }
    path = write_bundle(
        root / "bundle",
        name=IA3_NAME,
        kind="ia3",
        base=BaseSpec.from_dir(base),
        config={"modules": modules, "feedforward": feedforward},
        files={"ia3.safetensors": {f"{m}.ia3_l": v for m, v in vectors.items()}},
        validate=False,  # the kind is installed in the server, not in this process
    )
    return path, vectors, feedforward


def ia3_references(base: Path, images: list, ia3, forced_tokens: int = 0) -> dict[str, list[list[int]]]:
    """Greedy tokens per task (``base``, ``IA3_NAME``) and prompt (the base's prompt format) from PEFT's own
    IA³ (not the kind's code); ``forced_tokens``: that many tokens at least (``min_tokens``)."""
    import json

    import torch
    from peft import IA3Config, get_peft_model
    from transformers import AutoProcessor

    from deltaserve.plugins.base_spec import BaseSpec

    _, vectors, feedforward = ia3
    family = BaseSpec.from_dir(base).family
    model_type = json.loads((base / "config.json").read_text())["model_type"]
    processor = AutoProcessor.from_pretrained(str(base))
    config = IA3Config(
        target_modules=[family.to_module(m) for m in vectors],
        feedforward_modules=[family.to_module(m) for m in feedforward],
    )
    tuned = get_peft_model(hf_model_of(base), config)
    by_module = {family.to_module(m): v for m, v in vectors.items()}
    loaded = 0
    for name, module in tuned.named_modules():
        key = re.sub(r"^base_model\.model\.", "", name)
        if hasattr(module, "ia3_l") and key in by_module:
            with torch.no_grad():
                module.ia3_l["default"].copy_(by_module[key].reshape(module.ia3_l["default"].shape))
            loaded += 1
    assert loaded == len(vectors)
    out = {}
    for task, m in (("base", hf_model_of(base)), (IA3_NAME, tuned)):
        out[task] = [
            hf_greedy(m, processor, image_prompt(q, model_type), images[i], TUNED_TOKENS, forced_tokens)
            for i, q in enumerate(PROMPTS)
        ]
    assert out[IA3_NAME] != out["base"] and len({tuple(o) for o in out[IA3_NAME]}) == len(PROMPTS)
    return out


@pytest.fixture(scope="session")
def ia3(tiny_base, tmp_path_factory):
    """:func:`ia3_bundle` of the tiny LLaVA base."""
    return ia3_bundle(tiny_base, tmp_path_factory.mktemp("ia3"))


@pytest.fixture(scope="session")
def ia3_refs(tiny_base, sample_images, ia3):
    """:func:`ia3_references` of the LLaVA bundle."""
    return ia3_references(tiny_base, sample_images, ia3)


@pytest.fixture(scope="session")
def qwen_ia3(tiny_qwen_base, tmp_path_factory):
    """:func:`ia3_bundle` of the tiny Qwen2-VL base."""
    return ia3_bundle(tiny_qwen_base, tmp_path_factory.mktemp("qwen-ia3"))


@pytest.fixture(scope="session")
def qwen_ia3_refs(tiny_qwen_base, sample_images, qwen_ia3):
    """:func:`ia3_references` of the Qwen2-VL bundle, every answer forced to ``TUNED_TOKENS`` tokens."""
    return ia3_references(tiny_qwen_base, sample_images, qwen_ia3, TUNED_TOKENS)


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server on 127.0.0.1 (moto's standalone server: the S3 HTTP API, objects in its memory)
    and the environment a boto3 client (this process's, or a server's it starts) needs to reach it."""
    from moto.server import ThreadedMotoServer

    from deltaserve.client.process import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "deltaserve-test",
        "AWS_SECRET_ACCESS_KEY": "deltaserve-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_url(s3_server, request) -> str:
    """``s3://<a new bucket>/fleet``."""
    import boto3

    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-bucket"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/fleet"
