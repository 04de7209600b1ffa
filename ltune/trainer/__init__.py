"""The trainer every rank runs: ``python -m ltune.trainer RUN_DIR [--resume]``.

Importing this package is cheap (no torch). What the launcher also needs (the DeepSpeed
config, path rules, data checks) lives in ``ltune.job``, which never imports torch.
"""

from .errors import TrainerInputError

__all__ = ["TrainerInputError"]
