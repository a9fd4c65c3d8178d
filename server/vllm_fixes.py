"""Fixes for vLLM bugs that change outputs on our platforms, applied in every vLLM process.

Registered as a vLLM *general plugin* (entry-point group ``vllm.general_plugins`` in
``pyproject.toml``): vLLM calls :func:`apply` in the API process, the engine core and
every worker before a model runs. Each fix is idempotent and checks that the code it
replaces still looks the way it did when the fix was written, so a vLLM upgrade that
changes it fails loudly instead of being silently patched twice.

CPU LoRA, base rows in a mixed batch (vLLM 0.32 ``vllm/lora/ops/torch_ops/lora_ops.py``;
upstream: vllm-project/vllm PR #48421 and #49656, both open at the time of writing)
    The punica wrapper marks tokens that use no adapter with index ``-1``. The Triton
    kernels skip them; the pure-PyTorch ops used on CPU gather ``lora_weights[-1]``,
    i.e. the **last adapter slot**. Once ``max_loras`` adapters are resident, base
    requests batched next to LoRA requests silently receive that adapter's delta (found
    by ``tests/server/test_hot_swap.py``: base tokens changed when a fourth adapter was
    registered under traffic). The replacement ops below leave those rows at zero.

CPU LoRA, speed
    The same ops gather one weight matrix *per token* (``lora_weights[indices]``, a
    ``[tokens, rank, dim]`` copy) and run a batched einsum, for every LoRA-wrapped layer
    and step: half of a mixed batch on LoRA ran at 0.40× the base-only throughput
    (``bench/mixed.py``). The replacements group the rows by adapter slot — a batch holds
    at most ``max_loras`` of them, the grouping is computed once per step — and run one
    matmul per slot on its rows; ``add_lora_linear`` (every LoRA linear layer) goes
    straight to them, without the wrapper's per-slice buffers and index expansion, and
    runs one shrink and one expand per slot for all the layer's slices together (on the
    tiny base a step's cost is its number of torch calls: over base-only, the worker's
    extra CPU time for 96 requests half on one LoRA went from 0.39–0.56 s to 0.23–0.39 s
    in an ad-hoc probe of per-process CPU times, 2 and 3 rounds; ``bench/mixed.py`` has
    the throughput figures).
"""

from __future__ import annotations

import inspect
import logging

import torch

log = logging.getLogger(__name__)

_MARK = "_deltaserve_fixed"


_last_groups: tuple[bytes, list] | None = None


def _slot_groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """``(slot, rows)`` per adapter slot present in ``indices`` (rows None: every row). Every LoRA layer of a
    step sees the same indices, so the grouping of the last call is kept (keyed by the indices' bytes)."""
    global _last_groups
    key = indices.numpy().tobytes()
    if _last_groups is not None and _last_groups[0] == key:
        return _last_groups[1]
    groups = []
    for slot in torch.unique(indices).tolist():
        if slot >= 0:
            mask = indices == slot
            groups.append((slot, None if bool(mask.all()) else mask.nonzero().squeeze(1)))
    _last_groups = (key, groups)
    return groups


def _lora_rows(
    inputs: torch.Tensor, lora_weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``x_b @ W[idx_b]^T`` per row, one matmul per adapter slot present; exactly zero where ``idx_b == -1``."""
    weights = lora_weights.squeeze(dim=1) if lora_weights.dim() == 4 else lora_weights  # [slots, out, in]
    outputs = torch.zeros(inputs.shape[0], weights.shape[1], dtype=dtype, device=inputs.device)
    for slot, rows in _slot_groups(indices):
        weight = weights[slot].to(dtype=dtype).t()
        if rows is None:
            outputs = inputs.to(dtype=dtype) @ weight
        else:
            outputs[rows] = inputs[rows].to(dtype=dtype) @ weight
    return outputs


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = _lora_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = _lora_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs,
    lora_b_weights,
    output_tensor,
    lora_indices_tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
):
    outputs = _lora_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


_fused: dict[tuple[int, int], tuple[tuple, tuple, torch.Tensor, torch.Tensor]] = {}
"""(layer's first ``lora_a`` stack, slot) → (the stacks, their versions, the scale and dtype, ``A_cat``, ``B_bd``): see
:func:`_fused_slot`. Holding the stacks keeps their ids from passing to other tensors."""


def _fused_slot(
    lora_a_stacked, lora_b_stacked, output_slices, slot: int, scale: float, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """One slot's adapter over all of a layer's slices as two matrices: ``A_cat`` ``[in, slices·rank]`` (the slices'
    A stacked, times ``scale``) and ``B_bd`` ``[slices·rank, Σ out]`` (their B on the block diagonal, exact zeros
    elsewhere), so ``(x A_cat) B_bd`` is every slice's ``scale · (x Aᵢᵀ) Bᵢᵀ`` side by side. Rebuilt when vLLM writes
    a slot (``set_lora`` and ``reset_lora`` copy into the stacks in place, which bumps their version counters)."""
    stacks = (*lora_a_stacked, *lora_b_stacked)
    key, versions = (id(stacks[0]), slot), (scale, dtype, *(t._version for t in stacks))
    cached = _fused.get(key)
    if cached is not None and cached[1] == versions and all(s is t for s, t in zip(cached[0], stacks, strict=True)):
        return cached[2], cached[3]
    a = [(t.squeeze(dim=1) if t.dim() == 4 else t)[slot] for t in lora_a_stacked]  # each [rank, in]
    b = [(t.squeeze(dim=1) if t.dim() == 4 else t)[slot] for t in lora_b_stacked]  # each [out, rank]
    a_cat = (scale * torch.cat(a).t().to(torch.float32)).contiguous()
    b_bd = torch.zeros(sum(t.shape[0] for t in a), sum(output_slices), dtype=dtype)
    row = col = 0
    for ai, bi, size in zip(a, b, output_slices, strict=True):
        b_bd[row : row + ai.shape[0], col : col + size] = bi[:size].t().to(dtype)
        row, col = row + ai.shape[0], col + size
    _fused[key] = (stacks, versions, a_cat, b_bd)
    return a_cat, b_bd


def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
    """``PunicaWrapperCPU.add_lora_linear``: ``y[:, slice] += scale · (x Aᵀ) Bᵀ`` per slice, per slot's rows —
    the shrink/expand semantics of vLLM's CPU ops (float32 intermediate, then the output dtype). All slices of a
    fused layer (q/k/v, gate/up) go through one shrink and one expand per slot (:func:`_fused_slot`): on a small
    model the cost of these layers is the number of torch calls, not their arithmetic."""
    groups = _slot_groups(self.token_lora_indices)
    if not groups:
        return
    x = x.reshape(-1, x.shape[-1])
    out = y[:, : sum(output_slices)]
    for slot, rows in groups:
        a_cat, b_bd = _fused_slot(lora_a_stacked, lora_b_stacked, output_slices, slot, scale, y.dtype)
        xs = x if rows is None else x.index_select(0, rows)
        update = (xs.to(torch.float32) @ a_cat).to(y.dtype) @ b_bd
        if rows is None:
            out += update
        else:
            out.index_add_(0, rows, update)


FIXED_OPS = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}


def fix_cpu_lora_ops() -> bool:
    """Replace the three gather ops wherever vLLM's CPU path looks them up. Returns True if patched now."""
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without these modules: nothing to fix
        return False
    if getattr(lora_ops, _MARK, False):
        return False
    for name in FIXED_OPS:
        if "lora_b_weights[lora_indices_tensor]" not in inspect.getsource(
            getattr(lora_ops, name)
        ):  # the aliasing gather
            raise RuntimeError(
                f"vllm {name} changed since deltaserve's CPU LoRA fix was written: re-check server/vllm_fixes.py"
            )
    if "self.add_shrink(buffer, x, lora_a_stacked, scale" not in inspect.getsource(
        punica_cpu.PunicaWrapperCPU.add_lora_linear
    ):
        raise RuntimeError("vllm PunicaWrapperCPU.add_lora_linear changed: re-check server/vllm_fixes.py")
    for module in (lora_ops, torch_ops, punica_cpu):  # sgmv_* call the lora_ops globals
        for name, fixed in FIXED_OPS.items():
            if hasattr(module, name):
                setattr(module, name, fixed)
    punica_cpu.PunicaWrapperCPU.add_lora_linear = add_lora_linear
    setattr(lora_ops, _MARK, True)
    return True


def apply() -> None:
    """The ``vllm.general_plugins`` entry point (called once per vLLM process)."""
    if fix_cpu_lora_ops():
        log.debug("deltaserve: CPU LoRA ops skip no-adapter rows (vLLM PR #48421)")
