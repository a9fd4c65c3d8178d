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
