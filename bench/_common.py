"""Helpers the benchmarks share: the base to measure on, the workload's prompts and images,
machine facts, percentiles, CPU accounting. (``deltaserve serve`` as a child process:
:class:`deltaserve.client.process.ServerProcess`.)
"""

from __future__ import annotations

import io
import os
import platform
import subprocess
import sys
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
