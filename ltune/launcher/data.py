"""Early data checks, before anything is written or started.

The job's own checks (``ltune.job.data_files.validate_data``: every path exists, a
file is not empty, every line is a record the trainer accepts, the tokenizer folder holds
a tokenizer), raised as a one-line LaunchError. The trainer runs the same checks again.
"""

from __future__ import annotations

from ..job.data_files import validate_data
from ..job.errors import TrainerInputError
from ..planner.schema import Plan
from .errors import LaunchError


def validate_plan_data(plan: Plan) -> None:
    """Raise LaunchError (one line) when the plan's data cannot be read. Paths must be resolved."""
    try:
        validate_data(plan)
    except TrainerInputError as e:
        raise LaunchError(str(e)) from None
