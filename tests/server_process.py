"""Test servers: :class:`deltaserve.client.process.ServerProcess` with the tests' admin token and a small KV cache
(import as ``from server_process import …``)."""

from __future__ import annotations

from pathlib import Path

from deltaserve.client import process

ADMIN_TOKEN = "test-admin-token"
KV_CACHE_BYTES = 128 * 1024 * 1024


class ServerProcess(process.ServerProcess):
    def __init__(
        self, base: Path, store: Path, *extra: str, admin_token: str | None = ADMIN_TOKEN, env: dict | None = None
    ):
        super().__init__(
            base, store, "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), *extra, admin_token=admin_token, env=env
        )
