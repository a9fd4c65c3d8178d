"""One session-wide ``deltaserve serve`` (admin token ``ADMIN_TOKEN``).

Tests that must stop, restart or kill a server start their own :class:`ServerProcess`.
"""

from __future__ import annotations

import pytest

from server_process import ServerProcess


@pytest.fixture(scope="session")
def server(tiny_base, tmp_path_factory):
    srv = ServerProcess(tiny_base, tmp_path_factory.mktemp("server") / "store")
    yield srv
    srv.stop()
