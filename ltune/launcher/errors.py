"""The launcher's errors: each carries the exit code the CLI ends with."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..planner.schema import Evaluation


class LaunchError(ValueError):
    """A user mistake found before anything starts: one line, exit 2."""

    exit_code = 2


class FitRefused(LaunchError):
    """The plan no longer fits its target (exit 1); ``--force`` launches it anyway."""

    exit_code = 1

    def __init__(self, message: str, evaluation: "Evaluation") -> None:
        super().__init__(message)
        self.evaluation = evaluation
