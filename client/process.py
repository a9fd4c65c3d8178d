"""``deltaserve serve`` as a child process on 127.0.0.1 with ephemeral ports.

Used by the demo, the benchmarks and the tests: the ready line the server prints
(``deltaserve: ready grpc=… http=… base=…``) gives the addresses; the server runs in its
own process group so that a kill also takes vLLM's engine and worker processes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

READY = re.compile(r"deltaserve: ready grpc=(\S+) http=(\S+) base=(\S+)")
START_TIMEOUT_S = 600


class ServerProcess:
    """``deltaserve serve`` as a child process; stdout/stderr go to ``<store>.log``."""

    def __init__(self, base: Path, store: Path, *extra: str, admin_token: str | None = None, env: dict | None = None, log_path: Path | None = None):
        """``extra``: more ``deltaserve serve`` flags. Blocks until the server is ready; raises
        RuntimeError with the log's tail when it exits or does not get ready in time."""
        self.base, self.store = Path(base), Path(store)
        self.log_path = Path(log_path) if log_path else self.store.with_suffix(".log")
        args = [
            sys.executable, "-m", "deltaserve.client.cli", "serve", "--base", str(base), "--store", str(store),
            "--grpc-port", "0", "--http-port", "0", *extra,
        ]  # fmt: skip
        if admin_token:
            args += ["--admin-token", admin_token]
        self._log = open(self.log_path, "ab")
        # Own process group: a SIGKILL of the group also takes vLLM's engine and worker processes.
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._log, env={**os.environ, **(env or {})}, start_new_session=True
        )
        self.grpc = self.http = self.base_name = None
        self._lines: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                break
            self._lines.append(line)
            if m := READY.search(line):
                self.grpc, self.http, self.base_name = m.groups()
                break
        if self.grpc is None:
            self.proc.kill()
            raise RuntimeError(f"server did not start (exit {self.proc.poll()}); log: {self.log_path}\n{self.tail()}")
        # keep draining stdout so the child never blocks on a full pipe
        self._reader = threading.Thread(target=self._drain_stdout, daemon=True)
        self._reader.start()

    def _drain_stdout(self) -> None:
        for raw in self.proc.stdout:
            self._lines.append(raw.decode())

    @property
    def stdout(self) -> str:
        return "".join(self._lines)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def terminate(self, timeout: float = 120) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the server and its engine processes at once (a crash, not a shutdown)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait(60)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._reap_children()
            self._log.close()

    def _reap_children(self) -> None:
        """Whatever of the process group is left (after a kill, or a failed shutdown) goes too."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.terminate(60)
            except subprocess.TimeoutExpired:
                self.kill()
