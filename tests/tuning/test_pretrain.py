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
