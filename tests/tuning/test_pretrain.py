"""``pretrain``: a tiny run produces a scored, loadable base; a second run is a cache hit."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from deltaserve.tuning import train as train_module
from deltaserve.tuning.pretrain import META_FILE, PretrainConfig, cached_base, pretrain, pretrain_key
from deltaserve.tuning.world import GENERAL_TASKS, WorldConfig

TINY = PretrainConfig(
    steps=3, batch_size=4, warmup_steps=1, world=WorldConfig(general_train=6, downstream_train=1, val=1, test=3)
)


def _no_training(*args, **kwargs):
    raise AssertionError("a cache hit must not train")


def test_second_pretrain_is_a_cache_hit(monkeypatch):
    assert cached_base(TINY) is None
    first = pretrain(TINY, progress=False)
    assert not first.cached and cached_base(TINY) == first.path
    meta = json.loads((first.path / META_FILE).read_text())
    assert meta["stage"] == "pretrained" and set(meta["scores"]) == set(GENERAL_TASKS)
    assert 0.0 <= meta["general_score"] <= 1.0
    assert meta["train_hash"] == pretrain_key(TINY) and len(meta["data_hash"]) == 64
    assert (first.path / "model.safetensors").is_file() and (first.path / "tokenizer.json").is_file()

    monkeypatch.setattr(train_module, "train", _no_training)
    second = pretrain(TINY, progress=False)
    assert second.cached and second.path == first.path and second.meta == meta
    with pytest.raises(AssertionError, match="must not train"):
        pretrain(replace(TINY, seed=1), progress=False)


def test_cache_key_covers_what_shapes_the_weights():
    keys = {
        pretrain_key(TINY),
        pretrain_key(replace(TINY, seed=1)),
        pretrain_key(replace(TINY, steps=4)),
        pretrain_key(replace(TINY, lr=1e-4)),
        pretrain_key(replace(TINY, world=replace(TINY.world, general_train=7))),
        pretrain_key(replace(TINY, base=replace(TINY.base, text_layers=2))),
    }
    assert len(keys) == 6


def test_pretrained_base_loads_in_transformers():
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = pretrain(TINY, progress=False).path
    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(str(path))
    assert model.config.text_config.initializer_range == TINY.initializer_range
    assert processor.tokenizer.eos_token_id == model.config.text_config.eos_token_id


def test_a_qwen2_vl_base_pretrains_with_the_same_recipe(tmp_path):
    """``PretrainConfig(base=TinyQwen2VLConfig())`` (``deltaserve base pretrain --arch qwen2_vl``): the same
    data, schedule and scoring on the Qwen2-VL layout; the tower and merger get the per-part learning rates."""
    import torch
    from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration

    from deltaserve.plugins.families import QWEN2_VL
    from deltaserve.tuning.base.factory import TinyQwen2VLConfig

    config = replace(TINY, steps=12, base=TinyQwen2VLConfig())
    assert config.arch == "qwen2_vl" and config.train_config().lr_multipliers[0][0] == QWEN2_VL.vision_tower
    assert pretrain_key(config) != pretrain_key(TINY)
    result = pretrain(config, progress=False)
    meta = json.loads((result.path / META_FILE).read_text())
    assert meta["arch"] == "qwen2_vl" and meta["stage"] == "pretrained" and set(meta["scores"]) == set(GENERAL_TASKS)
    assert AutoConfig.from_pretrained(str(result.path)).model_type == "qwen2_vl"
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(result.path), dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(str(result.path))
    assert processor.tokenizer.eos_token_id == model.config.text_config.eos_token_id
    from deltaserve.tuning.base.factory import init_base

    initial = init_base(config.base_config(), config.seed)[2].state_dict()
    trained = model.state_dict()
    changed = [n for n in initial if n in trained and not torch.equal(initial[n], trained[n])]
    assert any(n.startswith("model.visual.") for n in changed) and any("language_model" in n for n in changed)
