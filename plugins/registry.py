"""The delta-kind registry, filled from the entry-point group ``deltaserve.plugins``.

Built-in kinds come through the same entry points as third-party ones (see
``pyproject.toml``), so installing a distribution that declares::

    [project.entry-points."deltaserve.plugins"]
    mykind = "mypkg:MyKind"

is all it takes to add a kind. Entry points are loaded lazily on first use. A broken
entry point does not take the registry down (the other kinds keep working); it is
reported by a warning and again, with its cause, whenever that kind is asked for.
"""

from __future__ import annotations

import inspect
import re
import threading
import warnings
from importlib.metadata import entry_points

from deltaserve.plugins.errors import KindRegistryError
from deltaserve.plugins.kind import ENGINES, DeltaKind

ENTRY_POINT_GROUP = "deltaserve.plugins"
KIND_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")

_lock = threading.RLock()
_kinds: dict[str, type[DeltaKind]] | None = None  # None: entry points not loaded yet
_broken: dict[str, str] = {}  # entry-point name → why it could not be registered


def _check(cls: object, name: str | None = None) -> str:
    """Return the kind's name, or raise :class:`KindRegistryError` saying what is wrong with ``cls``."""
    if not (inspect.isclass(cls) and issubclass(cls, DeltaKind)):
        raise KindRegistryError(f"{cls!r} is not a DeltaKind subclass")
    if inspect.isabstract(cls):
        raise KindRegistryError(f"kind class {cls.__qualname__} is abstract (implement validate and apply)")
    kind_name = getattr(cls, "name", None)
    if not isinstance(kind_name, str) or not KIND_NAME_RE.fullmatch(kind_name):
        raise KindRegistryError(f"kind name {kind_name!r} of {cls.__qualname__} must match {KIND_NAME_RE.pattern}")
    if name is not None and name != kind_name:
        raise KindRegistryError(f"entry point `{name}` loads kind `{kind_name}`: the names must be equal")
    if getattr(cls, "engine", None) not in ENGINES:
        raise KindRegistryError(
            f"kind `{kind_name}` has engine {getattr(cls, 'engine', None)!r}; expected one of {ENGINES}"
        )
    return kind_name


def _load_entry_points() -> dict[str, type[DeltaKind]]:
    loaded: dict[str, type[DeltaKind]] = {}
    _broken.clear()
    seen: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in seen and seen[ep.name] != ep.value:
            _broken[ep.name] = f"declared twice, by `{seen[ep.name]}` and `{ep.value}`"
            loaded.pop(ep.name, None)
            continue
        seen[ep.name] = ep.value
        try:
            cls = ep.load()
            loaded[_check(cls, ep.name)] = cls
        except Exception as exc:  # a broken plugin must not hide the working ones
            _broken[ep.name] = f"entry point `{ep.name} = {ep.value}` failed: {exc!r}"
    for why in _broken.values():
        warnings.warn(f"deltaserve: delta kind not registered: {why}", RuntimeWarning, stacklevel=3)
    return loaded


def _registry() -> dict[str, type[DeltaKind]]:
    global _kinds
    with _lock:
        if _kinds is None:
            _kinds = _load_entry_points()
        return _kinds


def kinds() -> dict[str, type[DeltaKind]]:
    """Every registered kind, name → class (a copy)."""
    return dict(sorted(_registry().items()))


def unknown_kind_message(name: str) -> str:
    """The one wording of "no such kind", shared by the registry and the bundle reader."""
    known = ", ".join(f"`{k}`" for k in sorted(_registry())) or "none"
    message = f"unknown kind `{name}`; known kinds: {known}"
    if name in _broken:
        message += f" (`{name}` is installed but broken: {_broken[name]})"
    return message


def get_kind(name: str) -> type[DeltaKind]:
    """The kind class registered as ``name``; raises :class:`KindRegistryError` if there is none."""
    cls = _registry().get(name)
    if cls is None:
        raise KindRegistryError(unknown_kind_message(name))
    return cls


def register_kind(cls: type[DeltaKind], *, replace: bool = False) -> type[DeltaKind]:
    """Register ``cls`` under ``cls.name`` (programmatic alternative to an entry point).

    Raises :class:`KindRegistryError` for a non-DeltaKind or abstract class, a bad name
    or binding, or a name already taken (unless ``replace=True``). Returns ``cls`` so it
    can be used as a class decorator.
    """
    name = _check(cls)
    with _lock:
        registry = _registry()
        if name in registry and registry[name] is not cls and not replace:
            raise KindRegistryError(
                f"kind `{name}` is already registered by {registry[name].__module__}.{registry[name].__qualname__}"
            )
        registry[name] = cls
    return cls


def unregister_kind(name: str) -> None:
    """Remove ``name`` from the registry (no error if absent)."""
    with _lock:
        _registry().pop(name, None)


def reload() -> dict[str, type[DeltaKind]]:
    """Forget every kind (programmatic ones too) and load the entry points again (tests, plugin installs)."""
    global _kinds
    with _lock:
        _kinds = None
        return kinds()
