"""Routers: which expert serves a request (a task delta, or the untouched base model).

Routers are plugins (entry-point group ``deltaserve.routers``). The service asks the
``explicit`` router when the request names a task, and the configured automatic
router (``--router``, default ``auto``) when it names none or ``"auto"``. Every
decision carries the router's name, a score and a human-readable reason; they go
back to the client and into the ``deltaserve_routing_decisions`` metric.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

from deltaserve.plugins.errors import DeltaServeError

ENTRY_POINT_GROUP = "deltaserve.routers"
_ROUTER_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


class RouterRegistryError(DeltaServeError):
    """An unknown router name, or a router class that cannot be registered."""


@dataclass
class RouteQuery:
    """What a router may look at."""

    text: str
    """The user's words (last user turn, without the chat template)."""
    image: Any = None
    """Decoded RGB ``PIL.Image`` or None."""
    task: str | None = None
    """The task the request names, if any."""


@dataclass
class RouteDecision:
    expert: str | None
    """A registered task name, or None for the base model."""
    score: float
    reason: str
    router: str
    scores: dict[str, float] = field(default_factory=dict)
    """The router's score of every candidate (tasks and ``base``), when it has them: the evidence behind the decision."""


@dataclass
class TaskCard:
    """What a router knows about one registered task (from its bundle manifest)."""

    name: str
    kind: str
    description: str
    examples: list[tuple[str, Any]]
    """(text, image or None) pairs; images as decoded RGB ``PIL.Image``."""
    target: float | None = None
    """The delta's measured score on its task (manifest ``task.metrics.target``), if recorded."""


class Router(ABC):
    """Picks the expert for a request.

    Contract: whenever the registry changes, the service calls :meth:`prepare` with every
    task of the next registry state (off the event loop; it may take a second) and then
    :meth:`install` right before requests can see that state, so a request never meets
    a task the router does not know, or the reverse; :meth:`route` must be cheap
    and must not block the event loop for long (it runs on it); it returns
    ``expert=None`` for the base model.
    """

    name: ClassVar[str]

    def __init__(self, options: dict[str, str] | None = None, **context: Any):
        self.options = dict(options or {})

    def update(self, tasks: list[TaskCard]) -> None:
        """The set of registered tasks changed (:meth:`prepare` then :meth:`install`)."""
        self.install(self.prepare(tasks))

    def prepare(self, tasks: list[TaskCard]) -> Any:
        """The slow part of a task-set change (runs off the event loop); returns what :meth:`install` needs."""
        return tasks

    def install(self, prepared: Any) -> None:  # noqa: B027 - optional hook
        """Make a prepared task set live, in one assignment (runs on the event loop, no await)."""

    @abstractmethod
    def route(self, query: RouteQuery) -> RouteDecision: ...


class ExplicitRouter(Router):
    """The request names its task: serve exactly that (existence is checked by the registry)."""

    name = "explicit"

    def route(self, query: RouteQuery) -> RouteDecision:
        return RouteDecision(query.task, 1.0, "the request named this task", self.name)


class BaseOnlyRouter(Router):
    """Automatic routing switched off: every request without a named task meets the base model."""

    name = "base"

    def route(self, query: RouteQuery) -> RouteDecision:
        return RouteDecision(None, 1.0, "no task named; automatic routing is off (router `base`)", self.name)


def available_routers() -> dict[str, type[Router]]:
    found: dict[str, type[Router]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if not _ROUTER_NAME.fullmatch(ep.name):
            raise RouterRegistryError(f"router entry point `{ep.name}` is not a valid router name")
        if ep.name in found:
            raise RouterRegistryError(f"router `{ep.name}` is declared twice")
        found[ep.name] = ep  # type: ignore[assignment]  (loaded lazily below)
    return found


def load_router(name: str, options: dict[str, str] | None = None, **context: Any) -> Router:
    routers = available_routers()
    if name not in routers:
        raise RouterRegistryError(f"unknown router `{name}`; available: {sorted(routers)}")
    cls = routers[name].load()  # type: ignore[attr-defined]
    if not (isinstance(cls, type) and issubclass(cls, Router)):
        raise RouterRegistryError(f"router `{name}` ({cls!r}) is not a deltaserve Router")
    return cls(options, **context)
