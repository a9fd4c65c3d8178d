"""How a `sparse` bundle stores one parameter's differences: the encodings (bundle format 2).

Each encoding holds the same thing — the flat row-major positions of the changed entries of a
base parameter ``P`` (strictly increasing) and their differences ``w - w0`` in the parameter's
dtype — as tensors of ``delta.safetensors``; ``config.params[P].encoding`` names it
(``v``: bytes per value, ``nnz``: changed entries, ``numel``: entries of ``P``):

``indices64``  ``P.indices`` int64 [nnz] + ``P.values`` [nnz]; nnz·(8 + v) bytes. Format 1's only
               form (format 1 has no ``encoding``).
``indices32``  ``P.indices`` int32 [nnz] + ``P.values`` [nnz]; nnz·(4 + v). At most 2**31 entries.
``gaps16``     ``P.gaps`` uint16 + ``P.values`` [nnz]; (nnz + escapes)·2 + nnz·v. One code per step
               from position -1: a code c ≥ 1 steps c entries forward onto the next changed entry, the
               escape 0 steps 65535 forward onto none (a gap g takes (g - 1) // 65535 escapes). The
               last code is not an escape.
``bitmask``    ``P.mask`` uint8 [ceil(numel / 8)] + ``P.values`` [nnz]; ceil(numel / 8) + nnz·v. Bit
               i % 8 (least significant first) of byte i // 8 is set when entry i changed; the padding
               bits past numel are 0. The values follow the positions in order.
``dense``      ``P.values`` [shape of P], 0 where unchanged; numel·v. F16, BF16, F32 or F64 only. The
               changed entries are its non-zero ones (-0.0 counts as 0), so a delta holding a zero
               difference is never written dense. (Differences of ``w != w0`` from
               :func:`~deltaserve.plugins.sparse.writer.sparse_from_dense` are never 0: IEEE
               subtraction of two different finite numbers is not.)

The writer stores each parameter in the encoding of the fewest tensor bytes (:func:`smallest`).
:func:`decode` turns any of them back into (int64 indices, values): the one place the kinds'
``apply``, ``serving_plan`` and ``validate`` read them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from deltaserve.plugins.kind_checks import dtype_name

if TYPE_CHECKING:
    import torch

ENCODINGS = ("dense", "bitmask", "indices32", "gaps16", "indices64")
"""Every encoding; on equal bytes the writer picks the earlier one."""
LEGACY = "indices64"
"""The encoding of format 1 bundles (their ``config.params`` entries name none)."""
_POSITIONS = {"indices64": "indices", "indices32": "indices", "gaps16": "gaps", "bitmask": "mask", "dense": "values"}
"""The tensor part that gives an encoding's positions."""
PARTS = {encoding: tuple(dict.fromkeys((part, "values"))) for encoding, part in _POSITIONS.items()}
"""Tensors of an encoding: ``f"{P}.{part}"`` for each part."""
_INT_DTYPES = {
    "indices64": ("I64", "int64"),
    "indices32": ("I32", "int32"),
    "gaps16": ("U16", "uint16"),
    "bitmask": ("U8", "uint8"),
}
"""safetensors and torch names of the positions' dtype."""
_DENSE_DTYPES = ("F16", "BF16", "F32", "F64")
_ESCAPE = 65535
_MAX_INDICES32 = 2**31


def encode(encoding: str, indices: torch.Tensor, values: torch.Tensor, shape) -> dict[str, torch.Tensor] | None:
    """``{part: tensor}`` of ``encoding`` for sorted unique int64 ``indices`` and their ``values``,
    or None when the encoding cannot hold them (too many entries for int32; for dense, a zero value
    or another dtype)."""
    import torch

    numel = math.prod(shape)
    if encoding == "indices64":
        return {"indices": indices, "values": values}
    if encoding == "indices32":
        return {"indices": indices.to(torch.int32), "values": values} if numel <= _MAX_INDICES32 else None
    if encoding == "gaps16":
        steps = torch.diff(indices, prepend=indices.new_tensor([-1]))
        escapes = (steps - 1) // _ESCAPE
        codes = torch.zeros(int(indices.numel() + escapes.sum()), dtype=torch.int32)
        codes[torch.cumsum(escapes + 1, 0) - 1] = (steps - escapes * _ESCAPE).to(torch.int32)
        return {"gaps": codes.to(torch.uint16), "values": values}
    if encoding == "bitmask":
        bits = torch.zeros(math.ceil(numel / 8) * 8, dtype=torch.uint8)
        bits[indices] = 1
        mask = (bits.view(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)
        return {"mask": mask, "values": values}
    if encoding == "dense":
        if dtype_name(values) not in _DENSE_DTYPES or bool((values == 0).any()):
            return None
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[indices] = values
        return {"values": dense.view(tuple(shape))}
    raise ValueError(f"unknown sparse encoding {encoding!r}")


def smallest(indices: torch.Tensor, values: torch.Tensor, shape) -> tuple[str, dict[str, torch.Tensor]]:
    """The encoding of ``indices``/``values`` with the fewest tensor bytes (exact), and its tensors."""
    candidates = ((name, encode(name, indices, values, shape)) for name in ENCODINGS)
    return min(
        ((name, parts) for name, parts in candidates if parts is not None),
        key=lambda item: sum(t.nbytes for t in item[1].values()),
    )  # min keeps the first of equals: ENCODINGS' order breaks ties


def decode(tensors: dict[str, torch.Tensor], name: str, spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat int64 indices, values) of parameter ``name`` from a bundle's ``tensors`` and its
    ``config.params`` entry ``spec`` (no ``encoding``: format 1's ``indices64``).
    Expects tensors that passed :func:`layout_problems`."""
    import torch

    encoding = spec.get("encoding", LEGACY)
    values = tensors[f"{name}.values"]
    if encoding in ("indices64", "indices32"):
        return tensors[f"{name}.indices"].to(torch.int64), values
    if encoding == "gaps16":
        codes = tensors[f"{name}.gaps"].to(torch.int64)
        positions = torch.cumsum(torch.where(codes == 0, _ESCAPE, codes), 0) - 1
        return positions[codes != 0], values
    if encoding == "bitmask":
        bits = (tensors[f"{name}.mask"].unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
        return torch.nonzero(bits.reshape(-1)).reshape(-1), values
    if encoding == "dense":
        flat = values.reshape(-1)
        indices = torch.nonzero(flat).reshape(-1)
        return indices, flat[indices]
    raise ValueError(f"unknown sparse encoding {encoding!r}")


def layout_problems(tensors: dict[str, torch.Tensor], name: str, encoding: str, shape: tuple[int, ...]) -> list[str]:
    """Dtypes, dimensions and lengths of the (present) tensors of ``encoding``: what :func:`decode` relies on."""
    numel = math.prod(shape)
    values = tensors[f"{name}.values"]
    if encoding == "dense":
        if dtype_name(values) not in _DENSE_DTYPES:
            return [f"`{name}.values` must be F16, BF16, F32 or F64 (dense), got {dtype_name(values)}"]
        if tuple(values.shape) != tuple(shape):
            return [f"`{name}.values` has shape {list(values.shape)}, expected the parameter's {list(shape)} (dense)"]
        return []
    problems = [] if values.dim() == 1 else [f"`{name}.values` must be 1-D, got shape {list(values.shape)}"]
    part = _POSITIONS[encoding]
    positions, (dtype, wanted) = tensors[f"{name}.{part}"], _INT_DTYPES[encoding]
    if dtype_name(positions) != dtype or positions.dim() != 1:
        return problems + [
            f"`{name}.{part}` must be a 1-D {wanted} tensor, got {dtype_name(positions)} {list(positions.shape)}"
        ]
    if encoding == "indices32" and numel > _MAX_INDICES32:
        problems.append(f"`{name}` has {numel} entries, too many for `indices32` (at most 2**31)")
    elif encoding == "gaps16" and positions.numel() and int(positions[-1]) == 0:
        problems.append(f"`{name}.gaps` ends with the escape code 0 (the last code must land on an entry)")
    elif encoding == "bitmask":
        if positions.numel() != math.ceil(numel / 8):
            problems.append(
                f"`{name}.mask` has {positions.numel()} bytes, expected ceil({numel} / 8) = {math.ceil(numel / 8)}"
            )
        elif numel % 8 and int(positions[-1]) >> (numel % 8):
            problems.append(f"`{name}.mask` has bits set beyond the parameter's {numel} entries")
    return problems


def counted(name: str, encoding: str, n: int) -> str:
    """How the positions tensor of ``encoding`` gives ``n`` changed entries, for messages."""
    what = {"gaps16": "non-zero codes", "bitmask": "bits set", "dense": "non-zero entries"}.get(encoding, "entries")
    return f"`{name}.{_POSITIONS[encoding]}` has {n} {what}"


def index_problems(label: str, indices: torch.Tensor, numel: int) -> list[str]:
    """Out-of-range, duplicate and unsorted ``indices`` (flat positions in a parameter of ``numel`` entries)."""
    if indices.numel() == 0:
        return []
    problems = []
    if int(indices.min()) < 0 or int(indices.max()) >= numel:
        problems.append(f"index out of range in `{label}`: indices must lie in [0, {numel})")
    steps = indices[1:] - indices[:-1]
    if bool((steps == 0).any()):
        problems.append(f"duplicate index in `{label}`")
    if bool((steps < 0).any()):
        problems.append(f"unsorted indices in `{label}` (must be strictly increasing)")
    return problems
