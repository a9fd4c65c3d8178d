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
    registered under traffic). The replacement ops below gather a valid slot for those
    rows and zero their contribution; rows with a real index are computed exactly as
    before.
"""

from __future__ import annotations

import inspect
import logging

import torch

log = logging.getLogger(__name__)

_MARK = "_deltaserve_fixed"


def _gather(lora_weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    selected = lora_weights[indices.clamp(min=0)].to(dtype=dtype)
    if selected.dim() == 4:
        selected = selected.squeeze(dim=1)
    return selected


def _lora_rows(
    inputs: torch.Tensor, lora_weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``x_b @ W[idx_b]^T`` per row; exactly zero where ``idx_b == -1`` (no adapter)."""
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=dtype), _gather(lora_weights, indices, dtype))
    return outputs.masked_fill((indices < 0).unsqueeze(-1), 0.0)


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
    for module in (lora_ops, torch_ops, punica_cpu):  # sgmv_* call the lora_ops globals
        for name, fixed in FIXED_OPS.items():
            if hasattr(module, name):
                setattr(module, name, fixed)
    setattr(lora_ops, _MARK, True)
    return True


def apply() -> None:
    """The ``vllm.general_plugins`` entry point (called once per vLLM process)."""
    if fix_cpu_lora_ops():
        log.debug("deltaserve: CPU LoRA ops skip no-adapter rows (vLLM PR #48421)")
