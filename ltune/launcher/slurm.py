"""The sbatch script for ``--launcher slurm``: one srun task per node, each a torchrun.

The pattern is the one PyTorch documents for torchrun under Slurm (torch elastic
"multi-node" docs): one task per node (``--ntasks-per-node=1``), every node's torchrun
meets at a c10d rendezvous on the first node of the allocation (``scontrol show
hostnames $SLURM_JOB_NODELIST | head -n 1``), the job id as the rendezvous id.
Every process then runs the same ``-m ltune.trainer RUN_DIR`` as a local launch.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .command import TRAINER_MODULE, NodeLayout, trainer_args

MASTER_ADDR_LINE = 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'


@dataclass(frozen=True)
class SbatchScript:
    """The script as data: #SBATCH directives, exports, and the srun command line."""

    directives: tuple[tuple[str, str], ...]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "."
    srun_argv: tuple[str, ...] = ()

    def render(self) -> str:
        lines = ["#!/bin/bash"]
        lines += [f"#SBATCH --{key}={value}" for key, value in self.directives]
        lines += ["", "# written by `ltune launch --launcher slurm`; submit with: sbatch THIS_FILE", "set -euo pipefail"]
        lines.append(f"cd {shlex.quote(self.cwd)}")
        lines += [f"export {key}={shlex.quote(value)}" for key, value in sorted(self.env.items())]
        lines.append(MASTER_ADDR_LINE)
        lines.append(" ".join(_shell_word(a) for a in self.srun_argv))
        return "\n".join(lines) + "\n"


def _shell_word(arg: str) -> str:
    """Quote one argument; ``$VAR`` references stay expandable (double quotes)."""
    if "$" in arg:
        if re.search(r'["`\\]', arg):
            raise ValueError(f"cannot quote {arg!r} for the sbatch script")
        return f'"{arg}"'
    return shlex.quote(arg)


def build_sbatch(
    run_dir: Path,
    layout: NodeLayout,
    master_port: int,
    *,
    job_name: str,
    gpus: bool = True,
    env: dict[str, str] | None = None,
    cwd: str | Path = ".",
    resume: bool = False,
    python: str | None = None,
) -> SbatchScript:
    directives = [
        ("job-name", job_name),
        ("nodes", str(layout.nnodes)),
        ("ntasks-per-node", "1"),
    ]
    if gpus:
        directives.append(("gpus-per-node", str(layout.nproc_per_node)))
    directives.append(("output", str(run_dir / "slurm-%j.out")))
    srun = [
        "srun", "--kill-on-bad-exit=1",
        python or sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(layout.nproc_per_node),
        "--nnodes", str(layout.nnodes),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"$MASTER_ADDR:{master_port}",
        "--rdzv-id", "$SLURM_JOB_ID",
        "-m", TRAINER_MODULE,
    ] + trainer_args(run_dir, resume)
    return SbatchScript(
        directives=tuple(directives), env=dict(env or {}), cwd=str(cwd), srun_argv=tuple(srun)
    )


def parse_sbatch(text: str) -> tuple[dict[str, str], list[str]]:
    """The #SBATCH directives and the srun argv of a script ``render`` wrote (for tests, reading back)."""
    directives: dict[str, str] = {}
    srun: list[str] = []
    for line in text.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            directives[key] = value
        elif line.startswith("srun "):
            srun = shlex.split(line)
    return directives, srun
