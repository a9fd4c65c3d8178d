"""Session-wide fixtures: one tiny base per test session, built with the real factory.

Engine start-ups (≈ 1 min each) are shared per session in the fixtures of the
sub-packages that need them; nothing here starts vLLM.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import deltaserve.plugins  # noqa: F401  (installs the CUDA-extension shim in this process)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory) -> None:
    """Fingerprint / artifact caches go to a per-session directory, never the user's."""
    os.environ.setdefault("DELTASERVE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """The embedded default base (random init, seed 0), built once per session. Read-only by convention."""
    from deltaserve.tuning.base.factory import build_base

    return build_base(tmp_path_factory.mktemp("base") / "tiny-llava", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_base(tmp_path_factory) -> Path:
    """The tiny random-init Qwen2-VL base (seed 0), built once per session. Read-only by convention."""
    from deltaserve.tuning.base.factory import build_base

    return build_base(tmp_path_factory.mktemp("base") / "tiny-qwen2-vl", seed=0, arch="qwen2_vl")


@pytest.fixture(scope="session")
def tiny_qwen_hub_base(tiny_qwen_base, tmp_path_factory) -> Path:
    """The tiny Qwen2-VL base with the tensor names of the published Qwen2-VL checkpoints (``visual.*`` and
    ``model.*``, as saved before transformers 5.x nested them): the same weights, renamed."""
    import shutil

    from safetensors.torch import load_file, save_file

    from deltaserve.plugins.families import QWEN2_VL, QWEN_HUB_LAYOUT

    hub = QWEN2_VL.for_checkpoint([f"{QWEN_HUB_LAYOUT[1]}layers.0.mlp.up_proj.weight"])
    assert hub.checkpoint_prefixes == QWEN_HUB_LAYOUT[0]
    out = tmp_path_factory.mktemp("base") / "tiny-qwen2-vl-hub"
    shutil.copytree(tiny_qwen_base, out)
    for file in out.glob("*.safetensors"):
        tensors = load_file(file)
        save_file({hub.to_checkpoint(name): t for name, t in tensors.items()}, file, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def hf_processor(tiny_base):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_base))


@pytest.fixture
def hf_model(tiny_base):
    """A fresh float32 transformers model of the tiny base (function scope: tests may modify it)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(tiny_base), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def sample_images():
    """Four deterministic 32×32 RGB images that differ from each other."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1234)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
