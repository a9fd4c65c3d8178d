"""Packaging and set-up: the package list covers every source package, pins are exact, the CUDA-extension shim works."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_source_package_is_packaged():
    """A non-editable install (the Docker image) ships only what `packages` lists."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for package, directory in setuptools["package-dir"].items():
        for init in (ROOT / directory).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / directory)
            found.add(".".join([package, *rel.parts]))
    assert found <= listed, f"not packaged: {sorted(found - listed)}"


def test_dependencies_are_pinned():
    deps = PYPROJECT["project"]["dependencies"] + [
        d for group in PYPROJECT["project"]["optional-dependencies"].values() for d in group
    ]
    assert all("==" in d for d in deps), [d for d in deps if "==" not in d]


def test_cuda_built_extensions_do_not_break_imports_in_a_fresh_process():
    """vLLM's worker processes import torchvision/torchaudio too: the .pth shim must act in every interpreter."""
    code = "import torchvision, torchaudio, transformers.audio_utils; from deltaserve.plugins import compat; print(compat.check())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "import" in proc.stdout
