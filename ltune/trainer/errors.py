"""The trainer's user-facing error: the job's ``TrainerInputError`` (ltune/job/errors.py),
shared with the launcher's data checks."""

from ..job.errors import TrainerInputError

__all__ = ["TrainerInputError"]
