"""Every environment variable deltaserve reads, in one place.

Lives in ``plugins`` because that is the package every other one may import.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``DELTASERVE_CACHE_DIR``: fingerprints, built/pretrained bases, demo artifacts.

    Default: ``$XDG_CACHE_HOME/deltaserve`` or ``~/.cache/deltaserve``.
    """
    explicit = os.environ.get("DELTASERVE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "deltaserve"


def admin_token() -> str | None:
    """``DELTASERVE_ADMIN_TOKEN``: default for ``deltaserve serve --admin-token`` and the client CLI."""
    return os.environ.get("DELTASERVE_ADMIN_TOKEN") or None


def server_address() -> str | None:
    """``DELTASERVE_SERVER``: default gRPC address (``host:port``) of the client CLI."""
    return os.environ.get("DELTASERVE_SERVER") or None


def http_address() -> str | None:
    """``DELTASERVE_HTTP``: default HTTP base URL of the client CLI (``deltaserve metrics``)."""
    return os.environ.get("DELTASERVE_HTTP") or None


def fault_pause() -> tuple[str, float, str | None] | None:
    """``DELTASERVE_FAULT_PAUSE=<point>:<seconds>[:<task>]``: a *test-only* fault-injection hook.

    The registry sleeps that long at the named point of a registration (of ``task`` only,
    if given): ``stored`` — the bundle is in the store but not in the index; ``indexed`` —
    the index names it, the call has not returned; ``unindexed`` (an unregistration) — the
    index no longer names it, its files are still in the store. A test can SIGKILL the server there.
    """
    value = os.environ.get("DELTASERVE_FAULT_PAUSE")
    if not value:
        return None
    point, seconds, task = (value.split(":") + ["", ""])[:3]
    return point, float(seconds or 30), task or None


ENGINE_OWN_GROUP = "DELTASERVE_ENGINE_OWN_GROUP"


def engine_own_group() -> bool:
    """``DELTASERVE_ENGINE_OWN_GROUP=1``: set by the server for the vLLM engine core it starts, which then
    leaves the server's process group (``deltaserve.server.engine_process``); not meant to be set by hand."""
    return os.environ.get(ENGINE_OWN_GROUP) == "1"


ENGINE_SPIN_MS = "DELTASERVE_ENGINE_SPIN_MS"


def engine_spin_ms() -> float | None:
    """``DELTASERVE_ENGINE_SPIN_MS``: how long the engine's processes busy-wait on vLLM's shared-memory queues
    after a message before they sleep on a socket (``deltaserve.server.engine_process``). Set by the server from
    ``--engine-spin-ms`` for the engine it starts; unset: vLLM's own (1 s)."""
    value = os.environ.get(ENGINE_SPIN_MS)
    return float(value) if value else None
