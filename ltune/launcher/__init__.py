"""`ltune launch`: plan -> run folder -> the job, through DeepSpeed's launcher, torchrun or Slurm.

The package returns data and raises errors; ltune/cli.py prints. ``plan_launch`` decides
everything (pure apart from file-system checks), ``write_spec`` writes the run folder,
``start`` runs the command.
"""

from .command import NodeLayout
from .errors import FitRefused, LaunchError
from .process import launch, start, write_spec
from .spec import LAUNCHERS, LaunchOptions, LaunchSpec, evaluate_fit, plan_launch, shortfall_message

__all__ = [
    "LAUNCHERS",
    "FitRefused",
    "LaunchError",
    "LaunchOptions",
    "LaunchSpec",
    "NodeLayout",
    "evaluate_fit",
    "launch",
    "plan_launch",
    "shortfall_message",
    "start",
    "write_spec",
]
