"""The `sparse` delta kind (selective tuning: per-parameter indices + differences)."""

from deltaserve.plugins.sparse.kind import DELTA_FILE, SparseKind
from deltaserve.plugins.sparse.writer import sparse_from_dense, write_sparse_bundle

__all__ = ["DELTA_FILE", "SparseKind", "sparse_from_dense", "write_sparse_bundle"]
