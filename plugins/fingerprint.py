"""Content fingerprint of a base model directory.

A delta is only valid on the exact base it was tuned from, so bundles record the
base's fingerprint and every load checks it. The fingerprint is a SHA-256 over:

- ``config.json``, canonicalised (parsed, keys sorted, compact separators);
- ``tokenizer.json`` when present (its raw bytes): the same weights with another
  tokenizer are a different model;
- every tensor of every ``*.safetensors`` file, in name order: name, dtype, shape
  and a SHA-256 of the raw bytes. Hashing per tensor (not per file) keeps the
  fingerprint independent of how the checkpoint is sharded or ordered.

Format: ``sha256:<64 hex digits>``; two different bases colliding would need a
SHA-256 collision. Computing it reads every weight once (≈ 1 s per GB); the result
is cached under :func:`deltaserve.plugins.env.cache_dir` keyed by the directory's
real path and the size, mtime and inode of every input file, so asking again is a
few ``stat`` calls.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from deltaserve.plugins import env
from deltaserve.plugins.safetensors_header import read_header

_CHUNK = 1 << 20
_CACHE_VERSION = 1


def _inputs(base_dir: Path) -> list[Path]:
    files = [base_dir / "config.json"]
    if (base_dir / "tokenizer.json").exists():
        files.append(base_dir / "tokenizer.json")
    return files + sorted(base_dir.glob("*.safetensors"))


def _signature(files: list[Path]) -> list[list]:
    sig = []
    for f in files:
        st = f.stat()
        sig.append([f.name, st.st_size, st.st_mtime_ns, st.st_ino])
    return sig


def _compute(base_dir: Path) -> str:
    h = hashlib.sha256(b"deltaserve-base-fingerprint-v1\0")
    config = json.loads((base_dir / "config.json").read_text())
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    tok = base_dir / "tokenizer.json"
    h.update(b"\0tokenizer\0" + (hashlib.sha256(tok.read_bytes()).digest() if tok.exists() else b""))
    entries = []  # (name, file, header entry, data start)
    for path in sorted(base_dir.glob("*.safetensors")):
        header, data_start = read_header(path)
        for name, meta in header.items():
            entries.append((name, path, meta, data_start))
    for name, path, meta, data_start in sorted(entries, key=lambda e: e[0]):
        begin, end = meta["data_offsets"]
        th = hashlib.sha256()
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            remaining = end - begin
            while remaining:
                chunk = f.read(min(_CHUNK, remaining))
                if not chunk:
                    raise ValueError(f"{path.name}: tensor `{name}` is truncated")
                th.update(chunk)
                remaining -= len(chunk)
        h.update(f"\0{name}\0{meta['dtype']}\0{meta['shape']}\0".encode() + th.digest())
    return "sha256:" + h.hexdigest()


def fingerprint(base_dir: str | os.PathLike, use_cache: bool = True) -> str:
    """Return the fingerprint of ``base_dir`` (see module docstring)."""
    base_dir = Path(base_dir).resolve()
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_dir} is not a model directory (no config.json)")
    files = _inputs(base_dir)
    if not use_cache:
        return _compute(base_dir)
    key = hashlib.sha256(str(base_dir).encode()).hexdigest()[:24]
    cache_file = env.cache_dir() / "fingerprints" / f"{key}.json"
    signature = _signature(files)
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("version") == _CACHE_VERSION and cached.get("signature") == signature:
            return cached["fingerprint"]
    except (OSError, ValueError, KeyError):
        pass
    value = _compute(base_dir)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps({"version": _CACHE_VERSION, "path": str(base_dir), "signature": signature, "fingerprint": value})
        )
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only cache only costs a recomputation
    return value
