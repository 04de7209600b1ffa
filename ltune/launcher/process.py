"""Writing the run folder and starting the job: the only impure part of the launcher."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from . import rundir
from .errors import LaunchError
from .spec import LaunchSpec

# after this many forwarded signals the job's processes are killed outright
KILL_AFTER_SIGNALS = 3


def write_spec(spec: LaunchSpec) -> None:
    """Write the spec's files: a new run folder whole, or (resume) single files in place."""
    if not spec.resume:
        rundir.write_run_dir(spec.run_dir, spec.files)
        return
    for name, text in spec.files.items():
        path = spec.run_dir / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


def start(spec: LaunchSpec) -> int:
    """Run ``spec.argv`` (no shell) with the spec's environment; return its exit code.

    The child gets its own process group and its output goes straight to ours (streamed,
    not captured). SIGINT and SIGTERM sent to ltune are forwarded to the whole group -
    the launcher and every rank, as a terminal's Ctrl-C would - so the trainer can
    checkpoint; a third signal kills the group. A child killed by signal N gives 128 + N.
    """
    env = {**os.environ, **spec.env}
    try:
        child = subprocess.Popen(list(spec.argv), env=env, cwd=spec.cwd, start_new_session=True)
    except FileNotFoundError:
        raise LaunchError(f"cannot start {spec.argv[0]!r}: no such program") from None

    received = 0

    def forward(signum: int, _frame) -> None:
        nonlocal received
        received += 1
        sig = signal.SIGKILL if received >= KILL_AFTER_SIGNALS else signum
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code


def launch(spec: LaunchSpec) -> int:
    """Write the run folder, then start the job (for slurm, ``sbatch`` submits the script)."""
    write_spec(spec)
    return start(spec)
