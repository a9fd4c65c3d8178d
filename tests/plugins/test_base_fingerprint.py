"""Base fingerprints (deterministic per seed, cached, content-sensitive) and BaseSpec."""

from __future__ import annotations

import shutil

import pytest

from deltaserve.plugins import fingerprint as fingerprint_module
from deltaserve.plugins.base_spec import BaseSpec
from deltaserve.plugins.fingerprint import fingerprint
from deltaserve.plugins.safetensors_header import read_header
from deltaserve.tuning.base.factory import WEIGHTS_FILE, build_base


def test_same_seed_same_fingerprint_other_seed_differs(tiny_base, tmp_path):
    again = build_base(tmp_path / "again", seed=0)
    assert fingerprint(again) == fingerprint(tiny_base)
    other = build_base(tmp_path / "other", seed=1)
    assert fingerprint(other) != fingerprint(tiny_base)


def test_qwen2_vl_same_seed_same_fingerprint_other_seed_differs(tiny_qwen_base, tiny_base, tmp_path):
    import json

    again = build_base(tmp_path / "again", seed=0, arch="qwen2_vl")
    assert fingerprint(again) == fingerprint(tiny_qwen_base)
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in tiny_qwen_base.iterdir())
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in tiny_qwen_base.iterdir())  # byte-identical
    other = build_base(tmp_path / "other", seed=1, arch="qwen2_vl")
    assert fingerprint(other) != fingerprint(tiny_qwen_base)
    assert fingerprint(tiny_qwen_base) != fingerprint(tiny_base)
    meta = json.loads((tiny_qwen_base / "deltaserve-base.json").read_text())
    assert (meta["arch"], meta["seed"], meta["stage"]) == ("qwen2_vl", 0, "random-init")
    assert json.loads((tiny_qwen_base / "config.json").read_text())["model_type"] == "qwen2_vl"


def test_cli_builds_the_qwen2_vl_base(tiny_qwen_base, tmp_path):
    import json

    from click.testing import CliRunner

    from deltaserve.client.cli import main

    result = CliRunner().invoke(main, ["base", "build", "--arch", "qwen2_vl", "--out", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["fingerprint"] == fingerprint(tiny_qwen_base)


def test_second_call_uses_the_cache(tiny_base, monkeypatch):
    first = fingerprint(tiny_base)

    def no_reading(_base_dir):
        raise AssertionError("fingerprint re-read the tensors instead of using the cache")

    monkeypatch.setattr(fingerprint_module, "_compute", no_reading)
    assert fingerprint(tiny_base) == first
    with pytest.raises(AssertionError, match="re-read"):  # the patch is live: only the cache answered
        fingerprint(tiny_base, use_cache=False)


def test_editing_one_tensor_byte_changes_it(tiny_base, tmp_path):
    copy = shutil.copytree(tiny_base, tmp_path / "edited")
    before = fingerprint(copy)
    weights = copy / WEIGHTS_FILE
    _, data_start = read_header(weights)
    with open(weights, "r+b") as f:
        f.seek(data_start + 101)
        byte = f.read(1)
        f.seek(data_start + 101)
        f.write(bytes([byte[0] ^ 0x01]))
    after = fingerprint(copy)  # the cache notices (size/mtime/inode signature)
    assert after != before
    assert after == fingerprint(copy, use_cache=False)


def test_base_spec_from_headers(tiny_base, base_spec):
    assert base_spec.name == tiny_base.name
    assert base_spec.fingerprint == fingerprint(tiny_base)
    assert base_spec.params["language_model.model.layers.0.mlp.down_proj.weight"] == ((128, 384), "F32")
    shapes = base_spec.module_shapes()
    assert shapes["language_model.model.layers.0.self_attn.k_proj"] == (64, 128)  # GQA: fewer KV heads
    assert shapes["multi_modal_projector.linear_1"] == (128, 64)
    assert "language_model.model.embed_tokens" not in shapes  # 2-D, but a lookup table
    assert "language_model.model.norm" not in shapes
    assert base_spec.config["architectures"] == ["LlavaForConditionalGeneration"]
    assert BaseSpec.from_dir(tiny_base) == base_spec
