"""File-level checks of an untrusted bundle directory: listing, types, magic bytes, hashes.

Nothing here executes or deserialises bundle content beyond JSON and safetensors
headers; sizes are known from ``stat`` before anything is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ALLOWED_SUFFIXES = (".json", ".safetensors", ".png", ".jpg", ".jpeg", ".md")
# Formats that unpickle (execute code) when loaded by torch/numpy/joblib.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # torch.save writes zip archives of pickles
_CHUNK = 1 << 20


def walk(root: Path, max_entries: int, problems: list[str]) -> dict[str, os.stat_result]:
    """Regular files under ``root`` as POSIX relative path → stat. Symlinks and special files are problems.

    Stops descending after ``max_entries`` entries so a huge tree cannot stall validation.
    """
    found: dict[str, os.stat_result] = {}
    pending, seen = [root], 0
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                seen += 1
                if seen > max_entries:
                    problems.append(f"more than {max_entries} files and folders (limit `max_files`)")
                    return found
                rel = Path(entry.path).relative_to(root).as_posix()
                if entry.is_symlink():
                    problems.append(f"symlink `{rel}` is not allowed")
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    found[rel] = entry.stat(follow_symlinks=False)
                else:
                    problems.append(f"`{rel}` is not a regular file")
    return found


def suffix(rel: str) -> str:
    return Path(rel).suffix.lower()


def type_problem(rel: str) -> str | None:
    """Why a file name is not allowed in a bundle (by extension), or None."""
    ext = suffix(rel)
    if ext in PICKLE_SUFFIXES:
        return f"pickle-type file `{rel}` is not allowed; deltas are safetensors only"
    if ext not in ALLOWED_SUFFIXES:
        return f"file `{rel}` has a type that is not allowed (allowed: {', '.join(ALLOWED_SUFFIXES)})"
    return None


def read_head(path: Path, n: int = 16) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def magic_problem(rel: str, head: bytes) -> str | None:
    """Why the first bytes do not fit the extension, or None.

    safetensors files are checked by parsing their header instead: their first 8 bytes
    are a length and can collide with the pickle opcode ``\\x80``.
    """
    ext = suffix(rel)
    if ext == ".safetensors":
        return None
    if (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head[:4] in _ZIP_MAGICS:
        return f"file `{rel}` is a pickle/zip archive (torch.save format) despite its `{ext}` name; deltas are safetensors only"
    if ext == ".png" and not head.startswith(_PNG_MAGIC):
        return f"file `{rel}` is not a PNG image"
    if ext in (".jpg", ".jpeg") and not head.startswith(_JPEG_MAGIC):
        return f"file `{rel}` is not a JPEG image"
    return None


def text_problem(rel: str, path: Path) -> str | None:
    """``.json`` must parse, ``.md`` must be UTF-8; None if fine (call only within the size limits)."""
    ext = suffix(rel)
    if ext not in (".json", ".md"):
        return None
    try:
        text = path.read_bytes().decode("utf-8")
        if ext == ".json":
            json.loads(text)
    except UnicodeDecodeError:
        return f"file `{rel}` is not UTF-8 text"
    except ValueError as exc:
        return f"file `{rel}` is not valid JSON: {exc}"
    return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
