"""Tuning methods: SPIDER's update by hand, every method end to end on the tiny base, exact export."""

from __future__ import annotations

import shutil

import pytest
import torch

from deltaserve.tuning.methods import METHODS
from deltaserve.tuning.methods.magnitude import MagnitudeHooks
from deltaserve.tuning.methods.spider import SpiderHooks, allocation, combine, importance
from deltaserve.tuning.tune import TuneConfig, tune
from deltaserve.tuning.world import WorldConfig, build_world

# ----------------------------------------------------------------------------- SPIDER by hand
#
# w0 = [1, 2, 3, -4]: |w0| has mean 2.5 and (unbiased) std sqrt(5/3) = 1.290994, so
#   z = [-1.161895, -0.387298, 0.387298, 1.161895],  Ipre = sigmoid(z):
IPRE = [0.238323, 0.404368, 0.595632, 0.761677]
# step 1: grad g1 = [4, -3, 0.5, 1] → G = g1, |G| mean 2.125, std 1.652019,
#   Ift = sigmoid([1.134974, 0.529654, -0.983645, -0.680983]) = [0.756756, 0.629403, 0.272169, 0.336042]
#   Ipre < Ift on coordinates 0 and 1: m = [0.756756/0.995079, 0.629403/1.033771, 0, 0] = [0.760499, 0.608843, 0, 0]
#   mean of the positives 0.684671 → m / mean = [1.110752, 0.889248] → min(·, 1) = [1, 0.889248, 0, 0]
M1 = [1.0, 0.889248, 0.0, 0.0]
#   the optimizer gave w~ = [0.9, 2.1, 2.8, -4.2] → w = w0 (1 - m) + w~ m:
W1 = [0.9, 2 * (1 - 0.889248) + 2.1 * 0.889248, 3.0, -4.0]  # = [0.9, 2.088925, 3, -4]
# step 2: grad g2 = [-1, 1, -3.5, 2] → G = [3, -2, -3, 3], |G| mean 2.75, std 0.5,
#   Ift = sigmoid([0.5, -1.5, 0.5, 0.5]) = [0.622459, 0.182426, 0.622459, 0.622459]
#   Ipre < Ift on coordinates 0 and 2: m = [0.723131, 0.511033] / mean 0.617082 → [1.171856, 0.828124] → [1, 0.828124]
M2 = [1.0, 0.0, 0.828124, 0.0]
#   w~ = w1 + [0.1, -0.1, 0.1, -0.1] → coordinate 1, selected before, returns to w0 = 2:
W2 = [1.0, 2.0, 3 * (1 - 0.828124) + 3.1 * 0.828124, -4.0]  # = [1, 2, 3.082812, -4]


def test_spider_update_matches_hand_computation():
    w0 = torch.tensor([1.0, 2.0, 3.0, -4.0])
    assert torch.allclose(importance(w0), torch.tensor(IPRE), atol=1e-6)
    g = torch.tensor([4.0, -3.0, 0.5, 1.0])
    m1 = allocation(importance(w0), g)
    assert torch.allclose(m1, torch.tensor(M1), atol=1e-6)
    assert torch.allclose(combine(w0, torch.tensor([0.9, 2.1, 2.8, -4.2]), m1), torch.tensor(W1), atol=1e-6)


def _drive(hooks, param: torch.nn.Parameter, steps: list[tuple[list[float], list[float]]]) -> list[torch.Tensor]:
    """Run ``hooks`` the way the training loop does: grad set, the optimizer's w~ written, after_step."""
    params = [("w", param)]
    hooks.on_start(None, params)
    seen = []
    for step, (grad, shift) in enumerate(steps):
        param.grad = torch.tensor(grad)
        hooks.after_backward(step, None, params)
        with torch.no_grad():
            param += torch.tensor(shift)  # stands in for optimizer.step()
        hooks.after_step(step, None, params)
        seen.append(param.detach().clone())
    return seen


def test_spider_hooks_two_steps_by_hand():
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, -4.0]))
    w1, w2 = _drive(
        SpiderHooks([("w", param)]),
        param,
        [([4.0, -3.0, 0.5, 1.0], [-0.1, 0.1, -0.2, -0.2]), ([-1.0, 1.0, -3.5, 2.0], [0.1, -0.1, 0.1, -0.1])],
    )
    assert torch.allclose(w1, torch.tensor(W1), atol=1e-6)
    assert torch.allclose(w2, torch.tensor(W2), atol=1e-6)
    assert w2[1].item() == 2.0 and w2[3].item() == -4.0  # unselected at step 2: exactly w0


def test_unselected_coordinates_return_to_w0_exactly():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64, 32))
    w0 = param.detach().clone()
    hooks = SpiderHooks([("w", param)])
    hooks.on_start(None, [("w", param)])
    for step in range(3):
        param.grad = torch.randn(64, 32)
        with torch.no_grad():
            param += 0.01 * torch.randn(64, 32)
        expected_m = allocation(hooks.state["w"].ipre, hooks.state["w"].g + param.grad)
        hooks.after_step(step, None, [("w", param)])
        unselected = expected_m == 0
        assert 0 < int(unselected.sum()) < param.numel()
        assert torch.equal(param.detach()[unselected], w0[unselected])  # bit for bit
        assert not torch.equal(param.detach()[~unselected], w0[~unselected])


def test_spider_edge_cases_follow_the_reference():
    assert torch.equal(importance(torch.zeros(3)), torch.zeros(3))  # all zero: no importance
    assert torch.isnan(importance(torch.ones(3))).all()  # constant |x|: no z-score …
    assert torch.equal(
        allocation(importance(torch.ones(3)), torch.tensor([1.0, 2.0, 3.0])), torch.zeros(3)
    )  # … selects nothing


def test_magnitude_freezes_the_largest_half():
    param = torch.nn.Parameter(torch.tensor([0.1, -5.0, 0.2, 4.0, -0.3, 3.0]))
    w0 = param.detach().clone()
    hooks = MagnitudeHooks([("w", param)], ratio=0.5)
    (w1,) = _drive(hooks, param, [([1.0] * 6, [0.5] * 6)])
    assert torch.equal(w1[[1, 3, 5]], w0[[1, 3, 5]])  # the three largest |w0| stay
    assert torch.equal(w1[[0, 2, 4]], w0[[0, 2, 4]] + 0.5)


# ----------------------------------------------------------------------------- every method on the tiny base


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny world: the downstream task ``digits`` and two general tasks (for the general score)."""
    root = tmp_path_factory.mktemp("tune-world")
    build_world(
        root / "all",
        WorldConfig(general_train=4, downstream_train=16, val=2, test=4),
        tasks=("digits", "colour", "arithmetic"),
    )
    (root / "general").mkdir()
    for name in ("colour", "arithmetic"):
        shutil.move(str(root / "all" / name), str(root / "general" / name))
    return {"digits": root / "all" / "digits", "general": root / "general"}


TINY = TuneConfig(
    steps=8, batch_size=16, lr=3e-3, examples=5, last_n_layers=1
)  # batch = the whole train split: a steady loss


@pytest.fixture(scope="module")
def tuned(tiny_base, world, tmp_path_factory):
    """method → TuneResult, each tuned once per module."""
    results = {}

    def get(method: str):
        if method not in results:
            out = tmp_path_factory.mktemp(f"bundle-{method}") / "bundle"
            results[method] = tune(
                tiny_base, world["digits"], method, out, TINY, general_dir=world["general"], progress=False
            )
        return results[method]

    return get


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_and_exports_a_valid_bundle(method, tuned, tiny_base):
    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.bundle import read_bundle

    result = tuned(method)
    assert result.losses[-1] < result.losses[0], result.losses
    bundle = read_bundle(result.path, base=BaseSpec.from_dir(tiny_base))
    manifest = bundle.manifest
    assert manifest.kind == METHODS[method].kind and manifest.name == "digits" and manifest.method.name == method
    assert manifest.task.description and len(manifest.task.examples) == TINY.examples
    assert all(e.image and (result.path / e.image).is_file() for e in manifest.task.examples)
    assert {"target", "general", "h", "general.colour", "general.arithmetic"} <= set(manifest.task.metrics)
    hyper = manifest.method.hyperparameters
    assert hyper["steps"] == TINY.steps and hyper["lr"] == TINY.lr and hyper["scope"]["last_n_layers"] == 1
    if manifest.kind == "sparse":
        assert (
            0 < manifest.config["density"] <= 1
            and manifest.config["trainable_numel"] == result.stats["trainable_params"]
        )


@pytest.mark.parametrize("method", ["spider", "lora", "bottleneck"])
def test_applied_bundle_reproduces_the_tuned_model_exactly(method, tuned, tiny_base, world, hf_processor):
    from transformers import LlavaForConditionalGeneration

    from deltaserve.plugins.bundle import read_bundle
    from deltaserve.tuning.batching import collate, encode
    from deltaserve.tuning.data import load_task

    result = tuned(method)
    samples = (
        load_task(world["digits"], splits=("test",))["test"][:2]
        + load_task(world["general"] / "arithmetic", splits=("test",))["test"][:2]
    )
    batch = collate(encode(hf_processor, samples), hf_processor.tokenizer.pad_token_id, with_targets=False)
    with torch.no_grad():
        tuned_logits = result.model(**batch).logits
        fresh = LlavaForConditionalGeneration.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
        base_logits = fresh(**batch).logits
        bundle = read_bundle(result.path)
        with bundle.kind.apply(fresh, bundle):
            applied_logits = fresh(**batch).logits
        restored_logits = fresh(**batch).logits
    assert not torch.equal(tuned_logits, base_logits)
    assert torch.equal(applied_logits, tuned_logits)
    assert torch.equal(restored_logits, base_logits)


def test_spider_delta_is_sparser_than_full(tuned):
    spider, full = tuned("spider").stats, tuned("full").stats
    assert spider["trainable_params"] == full["trainable_params"]
    assert spider["delta_params"] < full["delta_params"]
    assert 0.45 <= tuned("magnitude").stats["density"] <= 0.5


def test_vision_tower_stays_frozen_unless_asked(tuned, tiny_base):
    from deltaserve.plugins.bundle import read_bundle

    params = read_bundle(tuned("full").path).manifest.config["params"]
    assert any(p.startswith("multi_modal_projector.") for p in params)
    assert all(p.startswith(("multi_modal_projector.", "language_model.model.layers.3.")) for p in params)


# ----------------------------------------------------------------------------- every method on the tiny Qwen2-VL base

QWEN_TINY = TuneConfig(steps=6, batch_size=8, lr=3e-3, examples=2, last_n_layers=1, eval_limit=2)


# spider and magnitude are tuned on Qwen2-VL (and served) by tests/server/test_tuned_mixed.py; full is their code path.
@pytest.mark.parametrize("method", ["full", "lora", "bottleneck"])
def test_methods_tune_qwen2_vl_and_its_bundle_reproduces_the_model(method, tiny_qwen_base, world, tmp_path):
    """Every paradigm on Qwen2-VL: inputs (flattened patches, ``image_grid_thw``, ``mm_token_type_ids``) come from its processor; the
    scope's projector is the patch merger; applying the exported bundle gives the tuned model's logits exactly."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.bundle import read_bundle
    from deltaserve.tuning.batching import collate, encode
    from deltaserve.tuning.data import load_task

    result = tune(
        tiny_qwen_base, world["digits"], method, tmp_path / "b", QWEN_TINY, evaluate_general=False, progress=False
    )
    bundle = read_bundle(result.path, base=BaseSpec.from_dir(tiny_qwen_base))
    assert bundle.manifest.kind == METHODS[method].kind and bundle.manifest.method.name == method
    if bundle.manifest.kind == "sparse":
        params = bundle.manifest.config["params"]
        assert any(p.startswith("model.visual.merger.") for p in params)
        assert all(p.startswith(("model.visual.merger.", "model.language_model.layers.3.")) for p in params)
    processor = AutoProcessor.from_pretrained(str(tiny_qwen_base))
    samples = (
        load_task(world["digits"], splits=("test",))["test"][:2]
        + load_task(world["general"] / "arithmetic", splits=("test",))["test"][:1]
    )
    batch = collate(encode(processor, samples), processor.tokenizer.pad_token_id, with_targets=False)
    assert batch["pixel_values"].shape[0] == batch["image_grid_thw"].prod(-1).sum()  # two images' patches
    with torch.no_grad():
        tuned_logits = result.model(**batch).logits
        fresh = Qwen2VLForConditionalGeneration.from_pretrained(str(tiny_qwen_base), dtype=torch.float32).eval()
        base_logits = fresh(**batch).logits
        with bundle.kind.apply(fresh, bundle):
            applied_logits = fresh(**batch).logits
    assert not torch.equal(tuned_logits, base_logits)
    assert torch.equal(applied_logits, tuned_logits)
