"""Typed errors of deltaserve.

Every error the project raises on purpose derives from :class:`DeltaServeError`, so
the gRPC interceptor and the HTTP handlers can translate them to status codes in one
place (``BundleError`` → INVALID_ARGUMENT, …) and let anything else surface as a bug.
"""

from __future__ import annotations

import os


class DeltaServeError(Exception):
    """Base of all typed errors in deltaserve."""


class BundleError(DeltaServeError):
    """A delta bundle is invalid. ``problems`` lists *every* problem found, in order.

    Validation collects all problems first and raises once, so a user fixes a bundle
    in one round instead of one error at a time.
    """

    def __init__(self, path: str | os.PathLike, problems: list[str]):
        self.path = str(path)
        self.problems = list(problems) or ["unknown problem"]
        super().__init__(f"invalid delta bundle {self.path}: " + "; ".join(self.problems))


class KindRegistryError(DeltaServeError):
    """A delta kind is unknown, or a kind could not be registered (bad name, not a DeltaKind, duplicate)."""
