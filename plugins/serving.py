"""How a delta kind tells the serving engine what to compute: a :class:`ServingPlan`.

A kind serves itself through one method, :meth:`DeltaKind.serving_plan
<deltaserve.plugins.kind.DeltaKind.serving_plan>`, which reads a bundle and returns
the plan below in checkpoint names (transformers naming, as the bundle stores
them). The server never names a kind: it resolves the names to vLLM's modules and
applies the plan in one of two ways (:mod:`deltaserve.server.worker_deltas`):

- **concurrent** (the default): the delta gets a tag; in a shared batch, only the
  rows (tokens, or image features in the encoder) of its own requests see the
  delta. A tensor update on a linear layer becomes a second GEMM with the updated
  weight for those rows; an output map runs on those rows of the layer's output;
  an update of an RMSNorm weight recomputes those rows with the updated weight.
- **exclusive** (fallback, chosen by policy): the plan is turned into an engine
  state, as in the first deltaserve versions — for deltas above the per-delta
  memory budget, or touching tensors a per-row computation cannot serve
  (embeddings, the LM head, other norms).

Three primitives cover the built-in kinds and IA³-style rescaling:

``tensors``
    checkpoint tensor → a function from its base value to its value under the delta
    (selective tuning: ``w0 + Δ``). Exact in both modes: the engine computes with
    the updated tensor itself, never with ``W0·x + ΔW·x``.
``outputs``
    module (checkpoint name) → a function applied to the module's output ``y``
    (additive tuning: ``y + s·up(act(down(y)))``; IA³: ``y · l``). For a module vLLM
    fuses (``k_proj`` inside ``qkv_proj``), it receives the module's own columns.
``inputs``
    linear module → a function applied to its input ``x`` before the GEMM (IA³ on
    feed-forward layers: ``x · l``). Not on a fused module's shard: its shards share one input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class ServingPlan:
    tensors: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    """Checkpoint tensor name → ``base value ↦ value under the delta`` (same shape and dtype)."""
    outputs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    """Checkpoint module name → ``y ↦ y'`` on the module's output (last dimension: its output features)."""
    inputs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    """Checkpoint module name → ``x ↦ x'`` on the linear module's input."""

    def __post_init__(self) -> None:
        if not (self.tensors or self.outputs or self.inputs):
            raise ValueError("a serving plan must change something (no tensors, outputs or inputs)")
