"""The sbatch script for ``--launcher slurm``: one srun task per node, each a torchrun.

The pattern is the one PyTorch documents for torchrun under Slurm (torch elastic
"multi-node" docs): one task per node (``--ntasks-per-node=1``), every node's torchrun
meets at a c10d rendezvous on the first node of the allocation (``scontrol show
hostnames $SLURM_JOB_NODELIST | head -n 1``), the job id as the rendezvous id.
Every process then runs the same ``-m ltune.trainer RUN_DIR`` as a local launch.

Resources of the one task per node: ``--cpus-per-task`` (the node's cores for the job,
``hardware.cpus_per_node`` or 8 per GPU process), given to srun too (Slurm 22.05 to 23.02 do
not pass sbatch's value on to srun), and ``--mem=0``: all of each node's memory. The planner's
host-memory term counts offloaded optimizer states and weights, not each process's runtime
(Python, CUDA libraries, pinned buffers, torch.save's staging of a checkpoint), so a ``--mem``
computed from it would under-ask and the node's cgroup would kill the job mid-run; the job
holds the node's GPUs anyway. OMP_NUM_THREADS (exported) is the cores over the processes:
torchrun sets 1 when it is unset (torch/distributed/run.py), which starves DeepSpeed's CPU Adam.

Stopping before the time limit: ``--signal=USR1@S`` has Slurm send SIGUSR1 to every process of
the job step S seconds before the end (sbatch(1): all job steps, not the batch shell, are
signalled; with proctrack/cgroup that is every process, torchrun and the ranks). torchrun is
told to handle SIGUSR1 (``--signals-to-handle``: by default it does not, and SIGUSR1's default
action would kill it) and to forward it, waiting ``--shutdown-timeout`` seconds before SIGKILL;
the trainer saves a checkpoint on SIGUSR1 and exits. S is the plan's stop time (the step in flight
and a save, times a safety factor), at least 120 s.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .command import TRAINER_MODULE, NodeLayout, torchrun_stop_args, trainer_args

MASTER_ADDR_LINE = 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"'  # reads all: no SIGPIPE under pipefail
#: the only shell variables the script expands; every other word is single-quoted
EXPANDED_VARS = ("MASTER_ADDR", "SLURM_JOB_ID")
#: characters a #SBATCH value may not hold: bash reads the line as a comment, but a newline
#: would start a line that it runs, and sbatch itself splits on whitespace and reads quotes
#: and backslashes
_DIRECTIVE_BAD = re.compile(r"[\x00-\x20\x7f\"'\\]")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def job_name_for(model_name: str) -> str:
    """A Slurm job name from a model name: characters other than letters, digits, '.', '_'
    and '-' become '_' (the name is a label; the script never needs the original)."""
    return "ltune-" + re.sub(r"[^A-Za-z0-9._-]", "_", model_name)[:100]


@dataclass(frozen=True)
class ShellVar:
    """One argument made of a shell variable (one of EXPANDED_VARS) and a literal suffix."""

    name: str
    suffix: str = ""

    def __post_init__(self) -> None:
        if self.name not in EXPANDED_VARS:
            raise ValueError(f"sbatch: ${self.name} is not a variable the script sets")

    def render(self) -> str:
        return f'"${self.name}"' + (shlex.quote(self.suffix) if self.suffix else "")


@dataclass(frozen=True)
class SbatchScript:
    """The script as data: #SBATCH directives, exports, and the srun command line."""

    directives: tuple[tuple[str, str], ...]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "."
    srun_argv: tuple[str | ShellVar, ...] = ()

    def __post_init__(self) -> None:
        for key, value in self.directives:
            if _DIRECTIVE_BAD.search(value):
                raise ValueError(
                    f"sbatch --{key} {value!r}: spaces, quotes, backslashes and control characters "
                    "cannot be written into an #SBATCH line (rename the path or model)"
                )
        for key, value in self.env.items():
            if not _ENV_NAME.match(key):
                raise ValueError(f"sbatch: {key!r} is not a valid environment variable name")
            if "\x00" in value:
                raise ValueError(f"sbatch: environment variable {key} holds a NUL character")
        if "\x00" in self.cwd or any(isinstance(a, str) and "\x00" in a for a in self.srun_argv):
            raise ValueError("sbatch: a path or argument holds a NUL character")

    def render(self) -> str:
        """The script text; every string is single-quoted, only EXPANDED_VARS expand."""
        lines = ["#!/bin/bash"]
        lines += [f"#SBATCH --{key}={value}" for key, value in self.directives]
        lines += ["", "# written by `ltune launch --launcher slurm`; submit with: sbatch THIS_FILE", "set -euo pipefail"]
        lines.append(f"cd {shlex.quote(self.cwd)}")
        lines += [f"export {key}={shlex.quote(value)}" for key, value in sorted(self.env.items())]
        lines.append(MASTER_ADDR_LINE)
        lines.append(" ".join(a.render() if isinstance(a, ShellVar) else shlex.quote(a) for a in self.srun_argv))
        return "\n".join(lines) + "\n"


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
    cpus_per_task: int = 1,
    signal_s: int = 120,
    shutdown_timeout_s: int = 60,
) -> SbatchScript:
    """The script: one task per node with the node's cores and memory, SIGUSR1 ``signal_s``
    seconds before the time limit, torchrun forwarding it (module docstring)."""
    directives = [
        ("job-name", job_name),
        ("nodes", str(layout.nnodes)),
        ("ntasks-per-node", "1"),
        ("cpus-per-task", str(cpus_per_task)),
        ("mem", "0"),
    ]
    if gpus:
        directives.append(("gpus-per-node", str(layout.nproc_per_node)))
    directives.append(("signal", f"USR1@{signal_s}"))
    directives.append(("output", str(run_dir / "slurm-%j.out")))
    srun = [
        "srun", "--kill-on-bad-exit=1", f"--cpus-per-task={cpus_per_task}",
        python or sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(layout.nproc_per_node),
        "--nnodes", str(layout.nnodes),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", ShellVar("MASTER_ADDR", f":{master_port}"),
        "--rdzv-id", ShellVar("SLURM_JOB_ID"),
        *torchrun_stop_args(shutdown_timeout_s),
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
