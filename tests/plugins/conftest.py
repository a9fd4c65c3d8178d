"""Fixtures of the plugins tests: the base spec, one valid bundle per kind, generation helpers.

Bundles are built once per session ("pristine") and copied by tests that break them.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

PROMPTS = (
    (0, "<image>\nWhat colour is the circle?\nAnswer:"),
    (1, "<image>\nHow many shapes are there?\nAnswer:"),
    (2, "<image>\nWhere is the square?\nAnswer:"),
)
NEW_TOKENS = 5


def _png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sparse_deltas(base) -> dict:
    """The test delta of the sparse bundles: 10% of four decoder matrices, {param: (int64 indices, values)}."""
    gen = torch.Generator().manual_seed(1)
    deltas = {}
    for layer in (2, 3):
        for param in (
            f"language_model.model.layers.{layer}.self_attn.o_proj.weight",
            f"language_model.model.layers.{layer}.mlp.down_proj.weight",
        ):
            numel = torch.Size(base.params[param][0]).numel()
            indices = torch.randperm(numel, generator=gen)[: numel // 10].sort().values  # 10% density, ascending
            deltas[param] = (indices, torch.randn(indices.numel(), generator=gen) * 0.6)
    return deltas


def build_sparse(out: Path, base) -> Path:
    from deltaserve.plugins.manifest import Example, MethodInfo, TaskInfo
    from deltaserve.plugins.sparse import write_sparse_bundle

    deltas = sparse_deltas(base)
    task = TaskInfo(
        "colour questions", [Example("What colour is the circle?", "examples/circle.png")], {"accuracy": 0.5}
    )
    return write_sparse_bundle(
        out, name="colours", base=base, deltas=deltas, task=task, method=MethodInfo("spider", {"lr": 1e-3}),
        trainable_numel=4 * 128 * 384, extra_files={"examples/circle.png": _png(7), "README.md": b"# colours\n"},
    )  # fmt: skip


def build_sparse_v1(out: Path, base) -> Path:
    """The same delta in format 1, written by hand as the format 1 writer did: int64 indices, no `encoding`."""
    from safetensors.torch import save

    deltas = sparse_deltas(base)
    data = save({f"{p}.{part}": t for p, pair in deltas.items() for part, t in zip(("indices", "values"), pair)})
    params = {p: {"shape": list(base.params[p][0]), "nnz": i.numel()} for p, (i, _) in deltas.items()}
    numel = sum(torch.Size(e["shape"]).numel() for e in params.values())
    manifest = {
        "format_version": 1, "name": "colours-v1", "kind": "sparse",
        "base": {"name": base.name, "fingerprint": base.fingerprint},
        "task": {"description": "colour questions", "examples": [], "metrics": {}},
        "method": {"name": "spider", "hyperparameters": {}},
        "files": {"delta.safetensors": hashlib.sha256(data).hexdigest()},
        "config": {"params": params, "density": sum(e["nnz"] for e in params.values()) / numel, "trainable_numel": None},
    }  # fmt: skip
    out.mkdir(parents=True)
    (out / "delta.safetensors").write_bytes(data)
    (out / "delta.json").write_text(json.dumps(manifest, indent=2))
    return out


def reencode_sparse(bundle: Path, encoding: str) -> Path:
    """Store every parameter of the (format 2) sparse ``bundle`` in ``encoding``; manifest and hash follow."""
    from safetensors.torch import load_file, save

    from deltaserve.plugins.sparse.encoding import decode, encode

    manifest = json.loads((bundle / "delta.json").read_text())
    tensors, encoded = load_file(str(bundle / "delta.safetensors")), {}
    for name, spec in manifest["config"]["params"].items():
        parts = encode(encoding, *decode(tensors, name, spec), spec["shape"])
        encoded |= {f"{name}.{part}": t for part, t in parts.items()}
        spec["encoding"] = encoding
    data = save(encoded)
    (bundle / "delta.safetensors").write_bytes(data)
    manifest["files"]["delta.safetensors"] = hashlib.sha256(data).hexdigest()
    (bundle / "delta.json").write_text(json.dumps(manifest, indent=2))
    return bundle


def build_bottleneck(out: Path, base) -> Path:
    from deltaserve.plugins.bottleneck import BottleneckAdapter, write_bottleneck_bundle

    gen = torch.Generator().manual_seed(2)
    adapters = {}
    for layer in range(4):
        adapter = BottleneckAdapter(128, 8, "gelu", scaling=2.0)
        torch.nn.init.normal_(adapter.up.weight, std=0.5, generator=gen)  # a fresh adapter is the identity
        adapters[f"language_model.model.layers.{layer}.mlp.down_proj"] = adapter
    return write_bottleneck_bundle(out, name="shapes", base=base, adapters=adapters)


def lora_adapter_config(**overrides) -> dict:
    return {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": r".*language_model.*\.(q_proj|v_proj)",
        "bias": "none",
        **overrides,
    }


def build_lora(out: Path, base) -> Path:
    from deltaserve.plugins.lora import peft_key, write_lora_bundle

    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for layer in range(4):
        for proj, out_features in (("q_proj", 128), ("v_proj", 64)):
            module = f"language_model.model.layers.{layer}.self_attn.{proj}"
            tensors[peft_key(module, "A", base.family)] = torch.randn(4, 128, generator=gen) * 0.3  # [r, in]
            tensors[peft_key(module, "B", base.family)] = torch.randn(out_features, 4, generator=gen) * 0.3  # [out, r]
    return write_lora_bundle(out, name="counting", base=base, adapter_config=lora_adapter_config(), tensors=tensors)


BUILDERS = {"lora": build_lora, "sparse": build_sparse, "bottleneck": build_bottleneck, "sparse-v1": build_sparse_v1}


@pytest.fixture(scope="session")
def base_spec(tiny_base):
    from deltaserve.plugins.base_spec import BaseSpec

    return BaseSpec.from_dir(tiny_base)


@pytest.fixture(scope="session")
def pristine(base_spec, tmp_path_factory) -> dict[str, Path]:
    """One valid bundle per kind, and a format 1 sparse one (read-only by convention; copy before breaking)."""
    root = tmp_path_factory.mktemp("pristine")
    return {kind: build(root / kind, base_spec) for kind, build in BUILDERS.items()}


@pytest.fixture
def pristine_sparse_deltas(base_spec) -> dict:
    """What the pristine sparse bundles (both formats) hold: {param: (indices, values)}."""
    return sparse_deltas(base_spec)


@pytest.fixture
def bundle_copy(pristine, tmp_path):
    """``bundle_copy(kind)`` → a fresh copy of the pristine bundle of ``kind`` in tmp_path;
    ``bundle_copy("sparse:<encoding>")``: the sparse one with every parameter in that encoding."""

    def copy(kind: str) -> Path:
        kind, _, encoding = kind.partition(":")
        bundle = Path(shutil.copytree(pristine[kind], tmp_path / f"{kind}-bundle"))
        return reencode_sparse(bundle, encoding) if encoding else bundle

    return copy


@pytest.fixture(scope="session")
def prompt_inputs(hf_processor, sample_images):
    return [hf_processor(text=text, images=sample_images[i], return_tensors="pt") for i, text in PROMPTS]


def generate(model, inputs) -> list[list[int]]:
    """Greedy new tokens for each prompt."""
    outputs = []
    with torch.no_grad():
        for batch in inputs:
            out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
            outputs.append(out[0, batch["input_ids"].shape[1] :].tolist())
    return outputs


@pytest.fixture(scope="session")
def base_outputs(tiny_base, prompt_inputs) -> list[list[int]]:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    outputs = generate(model, prompt_inputs)
    # Non-degenerate, else "a delta changes the output" / "remove restores it" could pass vacuously.
    assert len({tuple(o) for o in outputs}) == len(outputs), outputs
    return outputs


@pytest.fixture
def generate_fn():
    return generate


@pytest.fixture
def warm_model(hf_model, prompt_inputs):
    """``hf_model`` after one generation: transformers installs its output-recording forward hooks
    on the first forward, and those must not be mistaken for leftovers of a delta."""
    generate(hf_model, prompt_inputs[:1])
    return hf_model
