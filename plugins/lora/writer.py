"""Write `lora` bundles, and import plain PEFT adapter directories as bundles."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from deltaserve.plugins.errors import BundleError
from deltaserve.plugins.file_checks import PICKLE_SUFFIXES
from deltaserve.plugins.lora.adapter_config import ADAPTER_CONFIG, ADAPTER_WEIGHTS, KEY_RE
from deltaserve.plugins.manifest import Example, MethodInfo, TaskInfo
from deltaserve.plugins.safetensors_header import HeaderError, read_header
from deltaserve.plugins.writer import write_bundle

if TYPE_CHECKING:
    import torch

    from deltaserve.plugins.base_spec import BaseSpec


def _jsonable(value):
    if isinstance(value, (set, frozenset)):  # LoraConfig.to_dict() keeps target_modules as a set
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _manifest_config(adapter_config: dict, keys: Iterable[str], family) -> dict:
    modules = sorted({family.to_checkpoint(m["module"]) for k in keys if (m := KEY_RE.fullmatch(k))})
    return {"r": adapter_config.get("r"), "lora_alpha": adapter_config.get("lora_alpha"), "modules": modules}


def _write(
    out_dir, adapter_config: dict, files: dict, keys: Iterable[str], method: MethodInfo | None, **common
) -> Path:
    """Shared tail of both writers: manifest config from the keys, default method, write + validate."""
    method = method or MethodInfo(
        "lora", {k: adapter_config.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules")}
    )
    return write_bundle(
        out_dir,
        kind="lora",
        config=_manifest_config(adapter_config, keys, common["base"].family),
        files=files,
        method=method,
        **common,
    )


def write_lora_bundle(
    out_dir: str | os.PathLike,
    *,
    name: str,
    base: BaseSpec,
    adapter_config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    task: TaskInfo | None = None,
    method: MethodInfo | None = None,
    extra_files: dict[str, bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a `lora` bundle from a PEFT config (``LoraConfig.to_dict()``) and PEFT-keyed factors.

    ``tensors`` as ``get_peft_model_state_dict(peft_model)`` returns them
    (``base_model.model.<module>.lora_A.weight`` …). Validated against ``base`` before publishing.
    """
    adapter_config = json.loads(json.dumps(dict(adapter_config), default=_jsonable))
    files = {
        ADAPTER_CONFIG: (json.dumps(adapter_config, indent=2, sort_keys=True) + "\n").encode(),
        ADAPTER_WEIGHTS: dict(tensors),
        **(extra_files or {}),
    }
    return _write(
        out_dir, adapter_config, files, tensors.keys(), method, name=name, base=base, task=task, overwrite=overwrite
    )


def import_peft_adapter(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str,
    base: BaseSpec,
    description: str = "",
    examples: Iterable[Example | str] = (),
    extra_files: dict[str, bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Turn a plain PEFT adapter directory (``PeftModel.save_pretrained``) into a `lora` bundle.

    The two PEFT files are copied byte for byte (so the bundle stays what PEFT wrote);
    anything else in ``src_dir`` (README.md, …) is left out. A pickled
    ``adapter_model.bin`` is refused: re-save with ``safe_serialization=True``.
    """
    src = Path(src_dir)
    problems = []
    if not (src / ADAPTER_WEIGHTS).is_file():
        pickled = [p.name for p in src.glob("adapter_model.*") if p.suffix in PICKLE_SUFFIXES]
        problems.append(
            f"pickle-type file `{pickled[0]}` is not allowed; deltas are safetensors only (re-save with safe_serialization=True)"
            if pickled
            else f"the adapter directory has no `{ADAPTER_WEIGHTS}`"
        )
    if not (src / ADAPTER_CONFIG).is_file():
        problems.append(f"the adapter directory has no `{ADAPTER_CONFIG}`")
    if problems:
        raise BundleError(src, problems)
    config_bytes = (src / ADAPTER_CONFIG).read_bytes()
    try:
        adapter_config = json.loads(config_bytes)
        header, _ = read_header(src / ADAPTER_WEIGHTS)
    except (ValueError, HeaderError) as exc:  # HeaderError is a ValueError; both name the broken file
        raise BundleError(src, [f"not a readable PEFT adapter: {exc}"]) from None
    if not isinstance(adapter_config, dict):
        raise BundleError(src, [f"`{ADAPTER_CONFIG}` must be a JSON object"])
    task = TaskInfo(
        description=description, examples=[e if isinstance(e, Example) else Example(text=e) for e in examples]
    )
    files = {ADAPTER_CONFIG: config_bytes, ADAPTER_WEIGHTS: (src / ADAPTER_WEIGHTS).read_bytes(), **(extra_files or {})}
    return _write(
        out_dir, adapter_config, files, header.keys(), None, name=name, base=base, task=task, overwrite=overwrite
    )
