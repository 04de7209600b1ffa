"""``python -m ltune.trainer RUN_DIR [--resume]``: what every rank of a job runs.

Exit codes: 0 done, 2 bad input (one line on stderr), 143 stopped by SIGTERM after
writing a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..planner.io import PlanError
from .errors import TrainerInputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltune.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="run folder holding plan.yaml (and ds_config.json)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    from .loop import Trainer

    try:
        return Trainer(args.run_dir, resume=args.resume).train()
    except (TrainerInputError, PlanError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"ltune.trainer: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
