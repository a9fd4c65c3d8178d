"""The vLLM fixes deltaserve applies in every vLLM process (``server/vllm_fixes.py``)."""

from __future__ import annotations

import pytest
import torch


def test_registered_as_a_vllm_general_plugin():
    from vllm.plugins import load_plugins_by_group

    from deltaserve.server import vllm_fixes

    assert load_plugins_by_group("vllm.general_plugins")["deltaserve_fixes"] is vllm_fixes.apply


def test_cpu_lora_ops_in_vllm_are_the_fixed_ones():
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    from deltaserve.server import vllm_fixes

    vllm_fixes.apply()
    vllm_fixes.apply()  # idempotent
    for name, fixed in vllm_fixes.FIXED_OPS.items():
        assert getattr(lora_ops, name) is fixed and getattr(punica_cpu, name) is fixed


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    slots, rank, hidden = 3, 4, 8
    indices = torch.tensor([0, -1, 2, -1, 1])  # -1: a base row, no adapter
    return {
        "x": torch.randn(len(indices), hidden, generator=g),
        "a": torch.randn(slots, 1, rank, hidden, generator=g),  # lora_a stacked: [slots, 1, rank, hidden]
        "b": torch.randn(slots, 1, hidden, rank, generator=g),
        "idx": indices,
    }


def test_shrink_and_expand_skip_base_rows(batch):
    from deltaserve.server.vllm_fixes import bgmv_expand, bgmv_expand_slice, bgmv_shrink

    x, a, b, idx = batch["x"], batch["a"], batch["b"], batch["idx"]
    rows = idx >= 0
    shrunk = torch.full((len(idx), a.shape[2]), 7.0)
    bgmv_shrink(x, a, shrunk, idx, scaling=0.5)
    for i, k in enumerate(idx.tolist()):
        expected = 0.5 * (a[k, 0] @ x[i]) if k >= 0 else torch.zeros(a.shape[2])
        torch.testing.assert_close(shrunk[i], expected, rtol=0, atol=1e-6)

    base_out = torch.randn(len(idx), b.shape[2])
    out = base_out.clone()
    bgmv_expand(shrunk, b, out, idx, add_inputs=True)
    assert torch.equal(out[~rows], base_out[~rows]), "a base row changed"
    for i in torch.nonzero(rows).flatten().tolist():
        torch.testing.assert_close(out[i], base_out[i] + b[idx[i], 0] @ shrunk[i], rtol=0, atol=1e-5)

    out = base_out.clone()
    bgmv_expand_slice(shrunk, b[:, :, :3], out, idx, 2, 3, add_inputs=True)
    assert torch.equal(out[~rows], base_out[~rows]) and torch.equal(out[:, :2], base_out[:, :2])


def test_unfixed_gather_would_alias_the_last_slot(batch):
    """What the fix is for: indexing with -1 silently picks the last adapter slot."""
    a, idx = batch["a"], batch["idx"]
    assert torch.equal(a[idx][1], a[-1])


def test_add_lora_linear_applies_each_rows_adapter_per_slice(batch):
    """The grouped ``add_lora_linear`` against a per-row loop: every slice gets ``scale · B_k A_k x`` of the row's slot
    ``k``; base rows (-1) are untouched."""
    import types

    from deltaserve.server.vllm_fixes import add_lora_linear

    g = torch.Generator().manual_seed(1)
    x, idx = batch["x"], batch["idx"]
    sizes = (5, 3)
    a = tuple(torch.randn(3, 1, 4, x.shape[1], generator=g) for _ in sizes)
    b = tuple(torch.randn(3, 1, n, 4, generator=g) for n in sizes)
    y0 = torch.randn(len(idx), sum(sizes), generator=g)
    y = y0.clone()
    add_lora_linear(types.SimpleNamespace(token_lora_indices=idx), y, x, a, b, 0.5, sizes)
    for i, k in enumerate(idx.tolist()):
        expected = y0[i].clone()
        if k >= 0:
            expected = expected + torch.cat([0.5 * (b[s][k, 0] @ (a[s][k, 0] @ x[i])) for s in range(len(sizes))])
        torch.testing.assert_close(y[i], expected, rtol=0, atol=1e-5)


def test_add_lora_linear_sees_an_adapter_written_into_its_slot(batch):
    """vLLM loads an adapter by copying it into the stacked weights in place (``set_lora``); the fused per-slot
    matrices ``add_lora_linear`` keeps must follow, or a slot would keep serving the adapter it held before."""
    import types

    from deltaserve.server.vllm_fixes import add_lora_linear

    x, idx = batch["x"], batch["idx"]
    a, b = (batch["a"].clone(),), (batch["b"].clone(),)
    wrapper = types.SimpleNamespace(token_lora_indices=idx)
    add_lora_linear(wrapper, torch.zeros(len(idx), b[0].shape[2]), x, a, b, 1.0, (b[0].shape[2],))
    b[0][2].copy_(torch.ones_like(b[0][2]))  # a new adapter in slot 2 (what set_lora does)
    y = torch.zeros(len(idx), b[0].shape[2])
    add_lora_linear(wrapper, y, x, a, b, 1.0, (b[0].shape[2],))
    row = idx.tolist().index(2)
    torch.testing.assert_close(y[row], b[0][2, 0] @ (a[0][2, 0] @ x[row]), rtol=0, atol=1e-5)
