"""Engine-free checks of the shared-batch row bookkeeping (``server/worker_deltas.py``); the engine paths are
tested token for token in ``test_tuned_mixed.py`` and ``test_exclusive.py``."""

from __future__ import annotations

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
