"""The errors a user can fix: every stage raises a `UserError` (or a subclass) for a bad config, a missing file or a
wrong mount, and the CLI prints its message and exits with its code instead of a traceback."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hvtune.masking import mask_secrets


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, wrong mount); the CLI prints it and exits 2.
    Every stage's user-facing errors derive from it."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    where: str  # a file path, an env var or a flag
    key: str
    value: Any
    rule: str

    def __str__(self) -> str:
        shown = mask_secrets({self.key: self.value})[self.key]  # a refused `hub_token` never prints the token
        return f"{self.where}: {self.key} = {shown!r}: {self.rule}"


class ConfigError(UserError):
    """One or more configuration problems; str() lists them all."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s):\n{lines}")
