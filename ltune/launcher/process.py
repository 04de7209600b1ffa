"""Writing the run folder and starting the job: the only impure part of the launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from . import rundir
from .errors import LaunchError
from .spec import LaunchSpec

# after this many forwarded signals the job's processes are killed outright
KILL_AFTER_SIGNALS = 3
# how long the job's other processes may outlive the launcher process when the spec does not
# say: the floor of the plan's stop grace (spec.grace_s: the step in flight and a checkpoint
# save, times a safety factor; ltune/planner/checkpointing.py stop_grace_s)
GROUP_GRACE_S = 60.0
#: forwarded to the job's process group: a terminal's Ctrl-C, a stop, Slurm's pre-timeout signal
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


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


#: where DeepSpeed's CPU all-reduce maps its per-rank buffers (POSIX shared memory)
SHM_DIR = Path("/dev/shm")
#: their names (deepspeed/ops/csrc/cpu/comm/shm.cpp SHM_BUFFER_NAME, `shm_initialize`):
#: deepspeed_allreduce_buffer_{uid}_{master addr}_{master port}_{rank}
SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer"


def remove_shm_buffers(master_port: int, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Remove the all-reduce buffers of the job that used `master_port` (this user's only).

    DeepSpeed's CPU accelerator maps one shared-memory file per rank (64 MiB each, in host
    memory) and never unlinks it (shm.cpp `shared_close` is not called for it), so each CPU run
    would leave world_size x 64 MiB behind in /dev/shm. Called once every process of the job
    is gone. Returns what was removed."""
    pattern = f"{SHM_BUFFER_PREFIX}_{os.getuid()}_*_{master_port}_*"
    removed = []
    try:
        found = sorted(shm_dir.glob(pattern))
    except OSError:
        return removed
    for path in found:
        try:
            path.unlink()
            removed.append(path)
        except OSError:  # another user's, or gone already
            pass
    return removed


def start(spec: LaunchSpec) -> int:
    """Run ``spec.argv`` (no shell) with the spec's environment; return its exit code.

    The child gets its own process group and its output goes straight to ours (streamed,
    not captured). SIGINT, SIGTERM and SIGUSR1 sent to ltune are forwarded to the whole group -
    the launcher and every rank, as a terminal's Ctrl-C would - so the trainer can
    checkpoint; a third signal kills the group. Once the launcher process exits, the rest of
    the group gets ``spec.grace_s`` to end, then its all-reduce buffers are removed
    (``remove_shm_buffers``). A child killed by signal N gives 128 + N.
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

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        code = child.wait()
        wait_for_group(child.pid, grace_s=max(GROUP_GRACE_S, spec.grace_s))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if spec.launcher != "slurm":  # this node's ranks are gone: their shared memory too
        remove_shm_buffers(spec.master_port)
    return 128 - code if code < 0 else code


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_for_group(pgid: int, grace_s: float = GROUP_GRACE_S, poll_s: float = 0.2) -> None:
    """Return once every process of the job's group is gone.

    DeepSpeed's runner dies at once on SIGTERM (its single-node path installs no
    handler) while its ``deepspeed.launcher.launch`` child is still stopping the ranks
    (SIGTERM, then SIGKILL after 30 s: launch.py ``terminate_process_tree``). Waiting
    here keeps ltune alive until the job really ended; after ``grace_s`` the group is killed.
    """
    deadline = time.monotonic() + grace_s
    while group_alive(pgid):
        if time.monotonic() > deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        time.sleep(poll_s)


def discard_failed_launch(spec: LaunchSpec, code: int) -> rundir.NeverRan | None:
    """After the job exited with ``code``: a new local run that failed before its first step
    leaves no run folder that ``--resume`` would take for a run (``rundir.discard_if_never_ran``).

    Only for a new run on one node, whose every process this launcher started and has seen
    end; never for slurm (the script is only submitted) or a resume. Returns what was found
    (None: nothing to do; ``other`` non-empty: the folder was kept).
    """
    if code == 0 or spec.resume or spec.launcher == "slurm" or spec.nodes.nnodes != 1:
        return None
    return rundir.discard_if_never_ran(spec.run_dir, spec.plan.layout.num_gpus)


def launch(spec: LaunchSpec) -> int:
    """Write the run folder, then start the job (for slurm, ``sbatch`` submits the script);
    a job that fails before its first step leaves no run folder (``discard_failed_launch``)."""
    write_spec(spec)
    code = start(spec)
    try:
        discard_failed_launch(spec, code)
    except OSError:  # a folder that cannot be removed stays as it is
        pass
    return code
