"""Code that runs inside vLLM's worker process (mixed into the worker class by vLLM).

vLLM imports this module in the worker before the model is loaded and adds
:class:`DeltaWorkerExtension` to the worker's bases; the engine reaches its methods
with ``collective_rpc(<method name>, args=...)`` (arguments and results are plain
types). Method names carry a ``ds_`` prefix: vLLM asserts they do not clash with
the worker's own. The work itself is in :mod:`deltaserve.server.worker_patches`.
"""

from __future__ import annotations

import time


class DeltaWorkerExtension:
    """Engine states for exclusive deltas (sparse, bottleneck)."""

    def _ds_states(self):
        states = getattr(self, "_deltaserve_states", None)
        if states is None:
            from deltaserve.server.worker_patches import StateManager

            states = self._deltaserve_states = StateManager(self.model_runner.model)
        return states

    def ds_stage(self, state: str, kind: str, bundle_dir: str, config: dict) -> dict:
        """Prepare (not activate) the patch of an exclusive delta. Returns a summary."""
        from deltaserve.server import worker_patches as wp

        if kind not in ("sparse", "bottleneck"):
            raise ValueError(f"no exclusive engine binding for kind `{kind}`")
        model, states = self.model_runner.model, self._ds_states()
        # Patches are built from the live model: build them in the base state, or a bottleneck would wrap another
        # state's patched layer and a sparse delta would start from another's weights (bench/soak.py found wrong
        # outputs that way). The RPC runs between forward passes, so no request sees the detour.
        previous = states.current
        states.activate(states.BASE)
        try:
            if kind == "sparse":
                patch = wp.build_sparse_patch(model, self.model_runner.model_config.model, bundle_dir, config)
            else:
                patch = wp.build_bottleneck_patch(model, bundle_dir, config)
            states.stage(state, patch)
        finally:
            states.activate(previous)
        return patch.summary

    def ds_activate(self, state: str) -> float:
        """Put the engine into ``state`` (``"base"``: the untouched base). Returns seconds taken."""
        started = time.perf_counter()
        self._ds_states().activate(state)
        return time.perf_counter() - started

    def ds_unstage(self, state: str) -> None:
        self._ds_states().unstage(state)

    def ds_live_hashes(self) -> dict:
        """sha256 per checkpoint tensor as the live model computes with it (see ``worker_patches.live_hashes``)."""
        from deltaserve.server.worker_patches import live_hashes

        return live_hashes(self.model_runner.model, self.model_runner.model_config.model)
