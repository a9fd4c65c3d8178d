"""Read a safetensors header without loading (or trusting) the file.

Used wherever a file may be untrusted (bundles) or large (bases): the header is
bounded, parsed as plain JSON, and checked for consistency before any tensor is
read. Nothing in a safetensors file is executable; this only guards sizes.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class HeaderError(ValueError):
    """The file is not a well-formed safetensors file."""


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """Return ``({tensor name: {"dtype", "shape", "data_offsets"}}, data_start)``.

    Raises :class:`HeaderError` naming the first inconsistency (bad length, bad JSON,
    unknown dtype, offsets outside the file or not matching dtype × shape).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise HeaderError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw_len)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise HeaderError(f"header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as exc:
            raise HeaderError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for name, meta in header.items():
        if not isinstance(meta, dict) or set(meta) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(f"tensor `{name}` has a malformed entry")
        dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise HeaderError(f"tensor `{name}` has unknown dtype `{dtype}`")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise HeaderError(f"tensor `{name}` has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise HeaderError(f"tensor `{name}` has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise HeaderError(f"tensor `{name}` lies outside the file")
        if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise HeaderError(f"tensor `{name}` byte size does not match dtype {dtype} × shape {shape}")
    return header, 8 + n
