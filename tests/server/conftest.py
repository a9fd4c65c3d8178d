"""One session-wide ``deltaserve serve`` (admin token ``ADMIN_TOKEN``).

Tests that must stop, restart or kill a server start their own :class:`ServerProcess`.
The session server also has a third-party delta kind installed: ``tests/kinds`` (the IA³
kind and its ``deltaserve.plugins`` entry point) is on its ``PYTHONPATH``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server_process import ServerProcess

THIRD_PARTY_KINDS = Path(__file__).resolve().parents[1] / "kinds"


@pytest.fixture(scope="session")
def server(tiny_base, tmp_path_factory):
    path = os.pathsep.join(p for p in (str(THIRD_PARTY_KINDS), os.environ.get("PYTHONPATH")) if p)
    srv = ServerProcess(tiny_base, tmp_path_factory.mktemp("server") / "store", env={"PYTHONPATH": path})
    yield srv
    srv.stop()
