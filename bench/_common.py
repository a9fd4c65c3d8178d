"""Helpers the benchmarks share: the base to measure on, the workload's prompts and images,
machine facts, percentiles, CPU accounting, and ``deltaserve serve`` as a child process.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPTS = ["What colour is the circle?", "How many shapes are there?", "Describe the image.", "Where is the square?"]


def pick_base(work: Path) -> tuple[Path, str]:
    """The cached pretrained base if there is one, else a freshly built random-init base (≈ 6 s)."""
    from deltaserve.tuning.base.factory import build_base
    from deltaserve.tuning.pretrain import cached_base

    pretrained = cached_base()
    if pretrained is not None:
        return pretrained, f"pretrained (cached at {pretrained})"
    return build_base(work / "base", seed=0), "random init, seed 0 (no pretrained base cached)"


def prompt_text(question: str) -> str:
    """A raw image prompt in the base's format (one ``<image>`` placeholder)."""
    from deltaserve.tuning.base.tokenizer import PROMPT_FORMAT

    return PROMPT_FORMAT.format(image="<image>\n", question=question)


def image(index: int, salt: int = 0):
    """A 32×32 RGB noise image, distinct per ``index``; ``salt`` changes one pixel so that the
    same index in another measurement has another content hash (no prefix/encoder-cache hits)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(index).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pixels[0, 0] = (salt & 0xFF, (salt >> 8) & 0xFF, 0x5A)
    return Image.fromarray(pixels)


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), ``q`` in [0, 100]."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """(CPU seconds of process ``pid``, CPU seconds of all its live descendants), user + system."""
    import psutil

    def cpu(p) -> float:
        try:
            t = p.cpu_times()
            return t.user + t.system
        except psutil.NoSuchProcess:
            return 0.0

    proc = psutil.Process(pid)
    return cpu(proc), sum(cpu(c) for c in proc.children(recursive=True))


def machine_facts() -> dict:
    def sh(cmd: str) -> str:
        return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True).stdout.strip()

    import torch
    import vllm

    return {
        "cpu_model": sh("lscpu | sed -n 's/^Model name:[[:space:]]*//p'") or platform.processor(),
        "nproc": int(sh("nproc") or os.cpu_count() or 0),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


ENGINE_GONE_S = 30


class Server:
    """``deltaserve serve`` as a child process on 127.0.0.1 with ephemeral ports.

    The same approach as :class:`deltaserve.client.process.ServerProcess` (own process group,
    parse the ``deltaserve: ready grpc=… http=… base=…`` line), plus what a benchmark on a
    shared machine needs: the start-up deadline holds even when the server prints nothing,
    and a start-up whose engine processes vanish (killed from outside) fails at once instead
    of waiting for a handshake that never comes.
    """

    READY = re.compile(r"deltaserve: ready grpc=(\S+) http=(\S+) base=(\S+)")

    def __init__(self, base: Path, store: Path, *flags: str, env: dict | None = None, timeout_s: float = 600):
        """``env``: the server's whole environment (default: this process's)."""
        self.log_path = Path(store).with_suffix(".log")
        self._log = open(self.log_path, "ab")
        args = [sys.executable, "-m", "deltaserve.client.cli", "serve", "--base", str(base), "--store", str(store),
                "--grpc-port", "0", "--http-port", "0", *flags]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._log, env=env, start_new_session=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        seen_engine, gone_since = False, None
        while True:
            try:
                line = lines.get(timeout=2.0)
            except queue.Empty:
                line = ""
            if line is None or self.proc.poll() is not None:
                self._fail(f"exited with {self.proc.poll()}")
            if m := self.READY.search(line):
                self.grpc, self.http, self.base_name = m.groups()
                return
            # Child processes come and go early on (vLLM's model-registry inspection subprocess runs
            # before the engine core starts), so only a lasting absence counts.
            engines = self._engine_processes()
            seen_engine = seen_engine or engines > 0
            gone_since = (gone_since or time.monotonic()) if seen_engine and engines == 0 else None
            if gone_since is not None and time.monotonic() - gone_since > ENGINE_GONE_S:
                self._fail(f"its engine processes disappeared during start-up (none for {ENGINE_GONE_S} s)")
            if time.monotonic() > deadline:
                self._fail(f"not ready after {timeout_s:.0f} s")

    def _read(self, lines: queue.Queue) -> None:
        for raw in self.proc.stdout:
            lines.put(raw.decode(errors="replace"))
        lines.put(None)

    def _engine_processes(self) -> int:
        import psutil

        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return 0
        count = 0
        for child in children:
            try:
                if "resource_tracker" not in " ".join(child.cmdline()):
                    count += 1
            except psutil.Error:
                pass
        return count

    def _fail(self, why: str) -> None:
        self.kill()
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"deltaserve serve {why}; log {self.log_path}:\n{tail}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(60)
        self._log.close()

    def stop(self, grace_s: float = 60) -> int | None:
        """SIGTERM (the server drains, then stops its engine); SIGKILL the group if that takes too long."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace_s)
        code = self.proc.poll()
        self.kill()  # whatever of the group is left (engine processes after a failed shutdown)
        return code
