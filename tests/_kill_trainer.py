"""Run one trainer process and kill it (os._exit, as SIGKILL would) at one point of a save.

python tests/_kill_trainer.py POINT TAG RUN_DIR [--resume]
POINT: after_model (DeepSpeed's model files written, optimizer files not),
after_optimizer (DeepSpeed's files written, ltune's rank state not), before_marker
(every file written, the completion marker not), none (no kill). TAG: the checkpoint
whose save is cut short (e.g. step_4).
"""

from __future__ import annotations

import os
import sys

from deepspeed.runtime.engine import DeepSpeedEngine

from ltune.trainer import checkpoint
from ltune.trainer.__main__ import main


def _die() -> None:
    sys.stdout.flush()
    os._exit(137)


def _kill_before(owner, name: str, tag_of) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if tag_of(*args, **kwargs) == KILL_TAG:
            _die()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    point, KILL_TAG, *rest = sys.argv[1:]
    if point == "after_model":
        _kill_before(DeepSpeedEngine, "_save_zero_checkpoint", lambda self, save_path, tag: tag)
    elif point == "after_optimizer":
        _kill_before(checkpoint, "_write_rank_state", lambda path, step, rank: path.name)
    elif point == "before_marker":
        _kill_before(checkpoint, "_write_marker", lambda path, step, world_size: path.name)
    elif point != "none":
        raise SystemExit(f"unknown kill point {point!r}")
    sys.exit(main(rest))
