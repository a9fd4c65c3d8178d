"""What a bundle is validated against: the base model's names, shapes and fingerprint.

Built from the safetensors *headers* and ``config.json`` only, so validating a
bundle never loads the base weights (the fingerprint is cached, see
:mod:`deltaserve.plugins.fingerprint`). All names are **checkpoint names**
(see :mod:`deltaserve.plugins.naming`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from deltaserve.plugins.fingerprint import fingerprint as compute_fingerprint
from deltaserve.plugins.safetensors_header import read_header


@dataclass(frozen=True)
class BaseSpec:
    """A base model as far as bundle validation needs it."""

    name: str
    """Directory name of the base (informational; the fingerprint is what must match)."""
    fingerprint: str
    """Content fingerprint, ``sha256:<hex>`` (see :func:`deltaserve.plugins.fingerprint.fingerprint`)."""
    params: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    """Checkpoint tensor name → (shape, safetensors dtype such as ``"F32"``)."""
    config: dict = field(default_factory=dict)
    """The parsed ``config.json``."""

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> BaseSpec:
        """Read headers, ``config.json`` and the (cached) fingerprint of a base directory."""
        path = Path(path)
        params: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in sorted(path.glob("*.safetensors")):
            header, _ = read_header(file)
            for name, meta in header.items():
                params[name] = (tuple(meta["shape"]), meta["dtype"])
        config = json.loads((path / "config.json").read_text())
        return cls(name=path.resolve().name, fingerprint=compute_fingerprint(path), params=params, config=config)

    @property
    def family(self):
        """The base's architecture family (:mod:`deltaserve.plugins.families`), from ``config.json``, in the layout of
        its tensor names."""
        from deltaserve.plugins.families import family_of

        return family_of(self.config, self.params)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """Linear-like module checkpoint name → ``(out_features, in_features)``.

        A module ``X`` is linear-like when ``X.weight`` is 2-D; embedding tables are 2-D
        too but are lookups, not linear maps, so names containing ``embed`` are left out.
        """
        shapes = {}
        for name, (shape, _) in self.params.items():
            if name.endswith(".weight") and len(shape) == 2:
                module = name[: -len(".weight")]
                if "embed" not in module.rsplit(".", 1)[-1]:
                    shapes[module] = (shape[0], shape[1])
        return shapes

    def param_dtype(self, name: str) -> str | None:
        """safetensors dtype of checkpoint parameter ``name``, or None if the base has no such parameter."""
        entry = self.params.get(name)
        return entry[1] if entry else None
