"""The trainer every rank runs: ``python -m ltune.trainer RUN_DIR [--resume]``.

Importing this package is cheap (no torch): the launcher uses
``ltune.trainer.ds_config.build_ds_config`` and ``ltune.trainer.data.validate_data``
before it starts any process.
"""

from .errors import TrainerInputError

__all__ = ["TrainerInputError"]
