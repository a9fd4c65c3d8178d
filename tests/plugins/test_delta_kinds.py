"""Matrix: every built-in delta kind × scenario on the tiny base (reference apply/remove exactness)."""

from __future__ import annotations

import pytest
import torch

from deltaserve.plugins.bundle import read_bundle
from deltaserve.plugins.registry import get_kind
from deltaserve.plugins.sparse.encoding import ENCODINGS

KINDS = ("lora", "sparse", "bottleneck")
SCENARIOS = ("validates", "changes_generation", "remove_is_exact", "context_manager")


def snapshot(model) -> tuple[dict[str, torch.Tensor], list]:
    """Every parameter (cloned) and the module tree: names, the module objects themselves, hooks, requires_grad."""
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    tree = [
        (
            name,
            id(m),
            type(m),
            tuple(m._forward_hooks),
            tuple(m._forward_pre_hooks),
            tuple(p.requires_grad for p in m.parameters(recurse=False)),
        )
        for name, m in model.named_modules()
    ]
    return params, tree


def assert_restored(model, before) -> None:
    params, tree = snapshot(model)
    assert tree == before[1]
    assert params.keys() == before[0].keys()
    for name, value in params.items():
        assert torch.equal(value, before[0][name]), f"{name} is not bit-identical after remove()"
    assert not hasattr(model, "peft_config")


def test_base_outputs_are_not_degenerate(base_outputs):
    # Otherwise "the delta changes the output" and "remove restores it" could pass vacuously.
    assert len({tuple(o) for o in base_outputs}) == len(base_outputs)
    assert all(len(set(o)) > 1 for o in base_outputs)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kind", KINDS)
def test_kind_scenario(kind, scenario, pristine, base_spec, warm_model, prompt_inputs, base_outputs, generate_fn):
    hf_model = warm_model
    bundle = read_bundle(pristine[kind], base=base_spec)
    assert bundle.manifest.kind == kind and isinstance(bundle.kind, get_kind(kind))
    if scenario == "validates":
        assert bundle.kind.validate(bundle, base_spec) == []
        assert bundle.kind.validate(bundle, None) == []  # base-independent checks alone pass too
        return
    before = snapshot(hf_model)
    if scenario == "changes_generation":
        applied = bundle.kind.apply(hf_model, bundle)
        assert applied.active
        assert generate_fn(hf_model, prompt_inputs) != base_outputs
        applied.remove()
    elif scenario == "remove_is_exact":
        applied = bundle.kind.apply(hf_model, bundle)
        generate_fn(hf_model, prompt_inputs[:1])
        applied.remove()
        applied.remove()  # idempotent
        assert not applied.active
        assert_restored(hf_model, before)
        assert generate_fn(hf_model, prompt_inputs) == base_outputs
    elif scenario == "context_manager":
        with bundle.kind.apply(hf_model, bundle):
            applied_outputs = generate_fn(hf_model, prompt_inputs[:1])
        assert_restored(hf_model, before)
        with bundle.kind.apply(hf_model, bundle):  # applying again after removal gives the same delta
            assert generate_fn(hf_model, prompt_inputs[:1]) == applied_outputs
        assert_restored(hf_model, before)


@pytest.mark.parametrize("stored", ["sparse-v1", "sparse", *(f"sparse:{e}" for e in ENCODINGS)])
def test_sparse_storage_applies_exactly(stored, bundle_copy, base_spec, hf_model, pristine_sparse_deltas):
    """Format 1 (int64 indices, by hand), the writer's choice and every encoding: apply and the serving
    plan give w0 + Δ bit for bit, computed directly on the plain tensors; remove restores w0."""
    from deltaserve.plugins.families import LLAVA

    bundle = read_bundle(bundle_copy(stored), base=base_spec)
    assert bundle.manifest.format_version == (1 if stored == "sparse-v1" else 2)
    named = dict(hf_model.named_parameters())
    w0 = {name: named[LLAVA.to_module(name)].detach().clone() for name in bundle.manifest.config["params"]}
    expected = {}
    for name, (indices, values) in pristine_sparse_deltas.items():
        flat = w0[name].clone().view(-1)
        flat[indices] = flat[indices] + values
        expected[name] = flat.view(w0[name].shape)
        assert not torch.equal(expected[name], w0[name])
    assert expected.keys() == w0.keys()
    plan = bundle.kind.serving_plan(bundle.path, bundle.manifest.config)
    with bundle.kind.apply(hf_model, bundle):
        for name, want in expected.items():
            assert torch.equal(named[LLAVA.to_module(name)], want), name
            assert torch.equal(plan.tensors[name](w0[name]), want), name
    for name in w0:
        assert torch.equal(named[LLAVA.to_module(name)], w0[name])
