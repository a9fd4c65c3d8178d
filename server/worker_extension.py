"""Code that runs inside vLLM's worker process (mixed into the worker class by vLLM).

vLLM imports this module in the worker before the model is loaded and adds
:class:`DeltaWorkerExtension` to the worker's bases; the engine reaches its methods
with ``collective_rpc(<method name>, args=...)``. Method names must not clash with
the worker's own (vLLM asserts that), hence the ``ds_`` prefix.
"""

from __future__ import annotations


class DeltaWorkerExtension:
    """Engine states for exclusive deltas (sparse, bottleneck); see :mod:`deltaserve.server.exclusive`."""

    def ds_ping(self) -> str:
        return type(self.model_runner.model).__name__
