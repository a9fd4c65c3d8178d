"""Engine-free checks of the shared-batch row bookkeeping (``server/worker_deltas.py``); the engine paths are
tested token for token in ``test_tuned_mixed.py`` and ``test_exclusive.py``."""

from __future__ import annotations

import pytest
import torch


def test_rows_of_each_tag_in_batch_order():
    from deltaserve.server.worker_deltas import _group

    # requests in input-batch order: (tag, scheduled tokens); None is the base
    rows = _group(["a", None, "b", "a", None], [3, 2, 1, 2, 4])
    assert {t: r.tolist() for t, r in rows.items()} == {"a": [0, 1, 2, 6, 7], "b": [5]}
    assert all(r.dtype == torch.long for r in rows.values())
    assert _group([None, None], [5, 1]) == {}


def test_encoder_rows_scale_with_each_images_embeddings():
    from deltaserve.server.worker_deltas import BatchRows

    rows = BatchRows()
    rows.items, rows.sizes = 3, [2, 1, 3]  # three images with 2, 1 and 3 embeddings
    x = torch.zeros(12, 4)  # a layer at twice the output's size (e.g. before a 2x merge)
    assert rows.index(torch.tensor([0, 2]), x).tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 10, 11]
    assert rows.index(torch.tensor([1]), torch.zeros(3, 4)).tolist() == [1]  # one row per image: the index itself


@pytest.mark.parametrize("fused", [False, True], ids=["rms_norm", "fused_add_rms_norm"])
def test_tagged_rms_norm_rows_at_once_equal_per_tag(fused):
    """vLLM's RMSNorm with rows of several deltas, each with its own weight: normalizing all tagged rows at once and
    applying each row's weight gives the same bits as running the norm once per delta with its weight (the path
    it replaces), and the base rows keep the base's result."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm

    from deltaserve.server.worker_deltas import ROWS, NormDispatch, _group

    g = torch.Generator().manual_seed(3)
    with set_current_vllm_config(VllmConfig()):
        norm = RMSNorm(32, eps=1e-6)
    norm.weight.data = torch.randn(32, generator=g)
    at_once = NormDispatch(norm)
    assert at_once.weight_last
    per_tag = NormDispatch(norm)
    per_tag.weight_last = False
    tags = [f"d{i}" for i in range(5)]
    for dispatch in (at_once, per_tag):
        for i, tag in enumerate(tags):
            dispatch.weights[tag] = {"weight": torch.randn(32, generator=torch.Generator().manual_seed(10 + i))}
    x, residual = torch.randn(24, 32, generator=g), torch.randn(24, 32, generator=g)
    layout = [None, "d0", "d3", None, "d1", "d0", "d4", "d2"]
    ROWS.rows = _group(layout, [3] * len(layout))
    try:
        outs = [d(x.clone(), residual.clone()) if fused else (d(x.clone()),) for d in (at_once, per_tag)]
    finally:
        ROWS.rows = {}
    base = norm.forward_native(x.clone(), residual.clone()) if fused else (norm.forward_native(x.clone()),)
    for got, want in zip(outs[0], outs[1], strict=True):
        assert torch.equal(got, want)
    base_rows = torch.tensor([0, 1, 2, 9, 10, 11])
    assert torch.equal(outs[0][0][base_rows], base[0][base_rows])
    assert not torch.equal(outs[0][0][3:6], base[0][3:6])  # a delta's rows do change
