"""``deltaserve demo --tiny``: the demo path end to end, as a user runs it (a child process, real server)."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "deltaserve.client.cli", "demo", "--tiny", "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    for expert, kind in (("digits-spider", "sparse"), ("relations-lora", "lora"), ("digits-bottleneck", "bottleneck")):
        assert f"registered {expert} ({kind}" in out, expert
        assert f"[{expert}]" in out
    assert "served by relations-lora" in out  # HTTP chat with model=relations-lora through the openai client
    assert "open-world text → auto router: tiny-llava" in out  # unlike any task → the untouched base
    assert "engine state switches:" in out and "registry operations: register/ok=3" in out
    assert "server stopped cleanly (exit 0)" in out
    assert (tmp_path / "demo" / "store" / "index.json").is_file()
