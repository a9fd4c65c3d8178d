"""Write `bottleneck` bundles from trained :class:`BottleneckAdapter` modules."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from deltaserve.plugins.bottleneck.adapter import BottleneckAdapter
from deltaserve.plugins.bottleneck.kind import ADAPTER_FILE
from deltaserve.plugins.manifest import MethodInfo, TaskInfo
from deltaserve.plugins.writer import write_bundle

if TYPE_CHECKING:
    from deltaserve.plugins.base_spec import BaseSpec


def write_bottleneck_bundle(
    out_dir: str | os.PathLike,
    *,
    name: str,
    base: BaseSpec,
    adapters: Mapping[str, BottleneckAdapter],
    task: TaskInfo | None = None,
    method: MethodInfo | None = None,
    extra_files: dict[str, bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a `bottleneck` bundle; ``adapters`` maps checkpoint module names to adapters.

    All adapters must share ``bottleneck_dim``, activation and scaling (the config records
    one of each); the bundle is validated against ``base`` before it is published.
    """
    first = next(iter(adapters.values()))
    settings = {(a.down.out_features, a.activation, a.scaling) for a in adapters.values()}
    if len(settings) != 1:
        raise ValueError(f"adapters disagree on (bottleneck_dim, activation, scaling): {sorted(settings)}")
    tensors = {}
    for module, adapter in sorted(adapters.items()):
        tensors.update(adapter.tensors(module))
    config = {
        "modules": sorted(adapters),
        "bottleneck_dim": first.down.out_features,
        "activation": first.activation,
        "scaling": first.scaling,
        "placement": "output",
    }
    method = method or MethodInfo(
        "bottleneck", {"bottleneck_dim": config["bottleneck_dim"], "activation": first.activation}
    )
    return write_bundle(
        out_dir,
        name=name,
        kind="bottleneck",
        base=base,
        config=config,
        files={ADAPTER_FILE: tensors, **(extra_files or {})},
        task=task,
        method=method,
        overwrite=overwrite,
    )
