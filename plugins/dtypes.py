"""safetensors dtype names ↔ torch dtypes (bundles and base specs speak safetensors names)."""

from __future__ import annotations

# Names as in the safetensors header; torch attributes resolved lazily (no torch import at module load).
_TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
    "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16",
    "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def torch_dtype(name: str):
    """``"F32"`` → ``torch.float32``. Raises ``KeyError`` for an unknown name."""
    import torch

    return getattr(torch, _TORCH_NAMES[name])


def safetensors_dtype(dtype) -> str:
    """``torch.float32`` → ``"F32"``. Raises ``KeyError`` for a dtype safetensors cannot store."""
    import torch

    for name, attr in _TORCH_NAMES.items():
        if getattr(torch, attr, None) == dtype:
            return name
    raise KeyError(f"no safetensors name for {dtype}")
