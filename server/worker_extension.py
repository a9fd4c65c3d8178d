"""Code that runs inside vLLM's worker process (mixed into the worker class by vLLM).

vLLM imports this module in the worker before the model is loaded and adds
:class:`DeltaWorkerExtension` to the worker's bases; the engine reaches its methods
with ``collective_rpc(<method name>, args=...)`` (arguments and results are plain
types). Method names carry a ``ds_`` prefix: vLLM asserts they do not clash with
the worker's own. The work itself is in :mod:`deltaserve.server.worker_patches` and
:mod:`deltaserve.server.worker_deltas`.
"""

from __future__ import annotations

import time
from pathlib import Path


class DeltaWorkerExtension:
    """Deltas served through their kind's serving plan: in the shared batch, or as engine states."""

    def _ds_states(self):
        states = getattr(self, "_deltaserve_states", None)
        if states is None:
            from deltaserve.server.worker_deltas import ConcurrentDeltas
            from deltaserve.server.worker_patches import StateManager

            states = self._deltaserve_states = StateManager(self.model_runner.model)
            self._deltaserve_concurrent = ConcurrentDeltas(self.model_runner, states)
        return states

    def ds_stage(self, tag: str, kind: str, bundle_dir: str, config: dict, budget_bytes: int) -> dict:
        """Prepare the delta's changes from its kind's serving plan: in the shared batch when they fit the
        per-delta budget and a per-row computation serves them, else as an (inactive) engine state named
        ``tag``. Returns ``{"mode": "concurrent"|"exclusive", "reason": …, "resident_bytes": …, …}``."""
        from deltaserve.plugins.registry import get_kind
        from deltaserve.server import worker_patches as wp

        started = time.perf_counter()
        model, states = self.model_runner.model, self._ds_states()
        concurrent = self._deltaserve_concurrent
        plan = get_kind(kind)().serving_plan(Path(bundle_dir), config)
        # Changes are resolved from the live model: do it in the base state, or a delta would start from another
        # state's weights and wrap its layers (bench/soak.py found wrong outputs that way). The RPC runs between
        # forward passes, so no request sees the detour.
        previous = states.current
        states.activate(states.BASE)
        try:
            changes = wp.resolve_plan(model, self.model_runner.model_config.model, plan)
            reason = concurrent.why_not(changes, budget_bytes)
            if reason is None:
                concurrent.add(tag, changes)
            else:
                states.stage(tag, wp.exclusive_patch(changes))
        finally:
            states.activate(previous)
        mode = "concurrent" if reason is None else "exclusive"
        return {"mode": mode, "reason": reason, **changes.summary, "stage_s": round(time.perf_counter() - started, 4)}

    def _ds_single_worker(self, what: str) -> None:
        """Weight read-back probes whole checkpoint tensors from the live model: not for a sharded one yet."""
        tp = self.model_runner.parallel_config.tensor_parallel_size
        if tp > 1:
            raise ValueError(f"{what} are not served with tensor parallelism yet (tensor_parallel_size {tp})")

    def ds_activate(self, state: str) -> float:
        """Put the engine into ``state`` (``"base"``: the untouched base). Returns seconds taken."""
        started = time.perf_counter()
        self._ds_states().activate(state)
        return time.perf_counter() - started

    def ds_unstage(self, tag: str) -> None:
        self._ds_states().unstage(tag)
        self._deltaserve_concurrent.remove(tag)

    def ds_live_hashes(self) -> dict:
        """sha256 per checkpoint tensor as the live model computes with it (see ``worker_patches.live_hashes``)."""
        from deltaserve.server.worker_patches import live_hashes

        self._ds_single_worker("weight read-backs")
        return live_hashes(self.model_runner.model, self.model_runner.model_config.model)
