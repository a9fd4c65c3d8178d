"""Typed errors of the tuning package."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deltaserve.plugins.errors import DeltaServeError


@dataclass(frozen=True)
class DataProblem:
    """One problem in task data: the file, the 1-based line (None: the whole file) and what is wrong."""

    path: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.message}"


class DataError(DeltaServeError):
    """Task data that cannot be used. ``problems`` holds every problem found; the message names each file and line."""

    MAX_LISTED = 20

    def __init__(self, problems: list[DataProblem]):
        self.problems = list(problems)
        listed = [str(p) for p in self.problems[: self.MAX_LISTED]]
        more = len(self.problems) - len(listed)
        if more > 0:
            listed.append(f"… and {more} more")
        head = f"invalid task data ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"
        super().__init__("\n  ".join([head, *listed]) if len(self.problems) != 1 else listed[0])
