"""The shared training loop and the scorer, on the tiny random-init base."""

from __future__ import annotations

import pytest
import torch

from deltaserve.tuning.batching import IGNORE_INDEX, BatchStream, collate, encode, prompt_text
from deltaserve.tuning.base.factory import format_prompt
from deltaserve.tuning.data import Sample, load_task
from deltaserve.tuning.evaluate import evaluate, general_score, normalize, token_f1
from deltaserve.tuning.train import TrainConfig, TrainHooks, _param_groups, lr_factor, train
from deltaserve.tuning.world import WorldConfig, build_world

from helpers import hf_greedy


@pytest.fixture(scope="module")
def toy_samples(tmp_path_factory) -> list[Sample]:
    root = tmp_path_factory.mktemp("toy-world")
    build_world(root, WorldConfig(general_train=8, val=1, test=1), tasks=("caption", "count", "arithmetic"))
    return [
        s for name in ("caption", "count", "arithmetic") for s in load_task(root / name, splits=("train",))["train"][:8]
    ]


def test_collate_labels_only_the_target(hf_processor, toy_samples):
    items = encode(hf_processor, toy_samples[:2] + toy_samples[-1:])
    batch = collate(items, hf_processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)  # the text-only sample brings no image
    for row, item in enumerate(items):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert labelled == item.target_ids and labelled[-1] == hf_processor.tokenizer.eos_token_id
        assert batch["attention_mask"][row].sum() == len(item.prompt_ids) + len(item.target_ids)
    assert (
        prompt_text(hf_processor, toy_samples[0]).startswith("<s><image>\n")  # the chat template carries the BOS
        and prompt_text(hf_processor, toy_samples[-1]) == "<s>" + toy_samples[-1].prompt + "\nAnswer:"
    )
    assert (batch["input_ids"] == 3).sum() == 2 * 16  # 16 image tokens per image


def test_loss_falls_and_hooks_choose_parameters(hf_model, hf_processor, toy_samples):
    class ProjectorOnly(TrainHooks):
        steps_seen: list[int] = []

        def trainable(self, model):
            return [
                (n, p)
                for n, p in model.named_parameters()
                if "multi_modal_projector" in n or "language_model.layers.3." in n
            ]

        def after_step(self, step, model, params):
            assert all(p.grad is not None for _, p in params)
            self.steps_seen.append(step)

    frozen_before = hf_model.get_parameter("model.vision_tower.embeddings.patch_embedding.weight").detach().clone()
    hooks = ProjectorOnly()
    config = TrainConfig(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, balance_tasks=True)
    result = train(hf_model, hf_processor, encode(hf_processor, toy_samples), config, hooks=hooks, progress=False)
    assert hooks.steps_seen == list(range(12))
    assert sum(result.losses[-3:]) / 3 < 0.7 * sum(result.losses[:3]) / 3, result.losses
    assert torch.equal(frozen_before, hf_model.get_parameter("model.vision_tower.embeddings.patch_embedding.weight"))
    assert 0 < result.trainable_parameters < sum(p.numel() for p in hf_model.parameters())


def test_batch_stream_is_seeded_and_balanced(hf_processor, toy_samples):
    items = encode(hf_processor, toy_samples)
    first = [[e.sample.id for e in next(BatchStream(items, 6, seed=1, balance_tasks=True))] for _ in range(2)]
    assert first[0] == first[1]
    stream = BatchStream(items, 6, seed=2, balance_tasks=True)
    drawn = [e.task for _ in range(10) for e in next(stream)]
    assert set(drawn) == {"caption", "count", "arithmetic"}
    assert (
        lr_factor(0, TrainConfig(steps=10, warmup_steps=2)) == 0.5
        and lr_factor(9, TrainConfig(steps=10, warmup_steps=2)) < 0.2
    )


def test_evaluate_matches_unbatched_greedy(hf_model, hf_processor, toy_samples):
    # Targets are the model's own one-at-a-time greedy answers for half the samples, wrong for the rest:
    # exact match must be exactly 0.5, which also proves batched, left-padded generation is faithful.
    tokenizer = hf_processor.tokenizer
    chosen = toy_samples[:4] + toy_samples[-4:]
    samples = []
    for i, s in enumerate(chosen):
        prompt = format_prompt(s.prompt, image=s.image is not None)
        ids = hf_greedy(hf_model, hf_processor, prompt, s.load_image() if s.image else None, max_new_tokens=6)
        answer = tokenizer.decode([t for t in ids if t != tokenizer.eos_token_id], skip_special_tokens=True)
        samples.append(Sample(s.id, s.prompt, answer if i % 2 == 0 else "#no such answer#", s.image, s.task))
    result = evaluate(hf_model, hf_processor, samples, max_new_tokens=6, batch_size=8, return_predictions=True)
    assert result["n"] == 8
    assert [normalize(p) for p in result["predictions"][::2]] == [normalize(s.target) for s in samples[::2]]
    assert result["exact_match"] == 0.5


def test_normalize_and_general_score():
    assert normalize("  Red Circle. ") == "red circle"
    assert normalize("top  left!?") == "top left"
    assert general_score({"a": 1.0, "b": 0.5}) == 0.75 and general_score({}) == 0.0


def test_token_f1_gives_partial_credit():
    assert (
        token_f1("Red circle top left, blue square bottom right.", "red circle top left, blue square bottom right")
        == 1.0
    )
    assert token_f1("red circle top left", "red square top left") == 0.75
    assert token_f1("", "red circle") == 0.0 and token_f1("", "") == 1.0 and token_f1("green", "red") == 0.0


def test_lr_multipliers_make_param_groups():
    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    params = [("model.vision_tower.x", a), ("model.multi_modal_projector.y", b), ("lm_head.weight", c)]
    config = TrainConfig(lr=1e-3, lr_multipliers=(("model.vision_tower.", 3.0), ("model.multi_modal_projector.", 1.0)))
    groups = sorted((round(g["lr"], 9), [id(p) for p in g["params"]]) for g in _param_groups(params, config))
    assert groups == [(0.001, [id(b), id(c)]), (0.003, [id(a)])]
