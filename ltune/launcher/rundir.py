"""The run folder: what a launch writes before anything starts, whole or not at all.

RUN_DIR/plan.yaml        the plan, paths made absolute, training.output_dir = RUN_DIR
RUN_DIR/ds_config.json   build_ds_config(plan)
RUN_DIR/command.json     {"argv": [...], "env": {...}, "cwd": "..."}
RUN_DIR/launch.sbatch    (--launcher slurm only)
RUN_DIR/deepspeed.env    (--hostfile only: what DeepSpeed's runner exports to the other nodes, dsenv.py)

Files are written into a temporary sibling folder that is renamed into place, so an
error leaves no half-written run folder. A job that then fails before its first step
leaves no folder either (``discard_if_never_ran``), so ``--resume`` never finds a run
that never ran.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..job.checkpoints import CHECKPOINTS_DIR, checkpoint_tags, choose
from ..job.paths import DS_CONFIG_FILE, PLAN_FILE, resolve_plan_paths  # the trainer applies the same rule to RUN_DIR/plan.yaml
from ..planner.io import plan_to_yaml
from ..planner.schema import Plan
from .dsenv import ENV_FILE
from .errors import LaunchError

COMMAND_FILE = "command.json"
SBATCH_FILE = "launch.sbatch"
METRICS_FILE = "metrics.jsonl"  # the trainer's log, a line per step (ltune/trainer/loop.py open_logs)
LAUNCH_FILES = frozenset({PLAN_FILE, DS_CONFIG_FILE, COMMAND_FILE, SBATCH_FILE, ENV_FILE})


def resolve_plan(plan: Plan, plan_dir: Path, run_dir: Path) -> Plan:
    """The plan as the run folder stores it: data/model/tokenizer paths absolute
    (relative to the plan file's folder) and ``training.output_dir`` the run folder."""
    resolved = resolve_plan_paths(plan, plan_dir)
    return resolved.model_copy(
        update={"training": resolved.training.model_copy(update={"output_dir": str(run_dir)})}
    )


def default_run_dir(plan: Plan, run_dir: str | Path | None, cwd: Path) -> Path:
    """``--run-dir``, else the plan's ``training.output_dir``, relative to the current folder."""
    folder = Path(run_dir if run_dir is not None else plan.training.output_dir).expanduser()
    return folder if folder.is_absolute() else (cwd / folder).resolve()


def check_fresh_run_dir(run_dir: Path) -> None:
    """A new run goes into a missing or empty folder, or replaces a launch that never ran
    (a folder holding only ltune's launch files). Anything else is refused."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise LaunchError(f"run folder {run_dir} exists and is not a folder")
    entries = {p.name for p in run_dir.iterdir()}
    if CHECKPOINTS_DIR in entries:
        raise LaunchError(
            f"run folder {run_dir} already holds a run with {CHECKPOINTS_DIR}/; "
            "pass --resume to continue it, or --run-dir for a new one"
        )
    extra = sorted(entries - LAUNCH_FILES)
    if extra:
        raise LaunchError(
            f"run folder {run_dir} is not empty (holds {extra[0]}); pass --run-dir for a new run"
        )


def check_resume_run_dir(run_dir: Path) -> Plan:
    """``--resume``: the folder must hold its plan and a complete checkpoint for the plan's
    process count (``ltune.job.checkpoints.choose``, the trainer's own pick); returns the plan."""
    from ..planner.io import PlanError, load_plan

    if not run_dir.is_dir():
        raise LaunchError(f"--resume: run folder {run_dir} does not exist")
    if not checkpoint_tags(run_dir):
        raise LaunchError(f"--resume: run folder {run_dir} holds no checkpoint in {CHECKPOINTS_DIR}/")
    try:
        plan = load_plan(run_dir / PLAN_FILE)
    except PlanError as e:
        raise LaunchError(f"--resume: {e}") from None
    tag, skipped = choose(run_dir, plan.layout.num_gpus)
    if tag is None:
        newest, reason = skipped[0]
        older = f"; {len(skipped) - 1} older one(s) incomplete too" if len(skipped) > 1 else ""
        raise LaunchError(
            f"--resume: run folder {run_dir} holds no complete checkpoint to resume from "
            f"(newest, {newest}: {reason}{older})"
        )
    return plan


@dataclass(frozen=True)
class NeverRan:
    """What a run folder holds after its job stopped before logging a step."""

    ours: tuple[str, ...]  # the launch files, an empty checkpoints/, an empty or torn metrics.jsonl
    other: tuple[str, ...]  # anything else: the folder is kept


def _logged_a_step(metrics: Path) -> bool:
    """Whether metrics.jsonl holds a whole line (a torn last line is a write cut short)."""
    with metrics.open("rb") as f:
        for line in f:
            try:
                if line.endswith(b"\n") and isinstance(json.loads(line), dict):
                    return True
            except ValueError:
                continue
    return False


def never_ran(run_dir: Path, world_size: int) -> NeverRan | None:
    """None when the job trained (a complete checkpoint, or a step in metrics.jsonl), or
    the folder is gone; else its entries, split into ltune's own and the rest."""
    if not run_dir.is_dir() or choose(run_dir, world_size)[0] is not None:
        return None
    ours, other = [], []
    for entry in sorted(run_dir.iterdir()):
        name = entry.name
        if entry.is_symlink():
            other.append(name)
        elif name in LAUNCH_FILES and entry.is_file():
            ours.append(name)
        elif name == CHECKPOINTS_DIR and entry.is_dir() and not any(entry.iterdir()):
            ours.append(name)
        elif name == METRICS_FILE and entry.is_file():
            if _logged_a_step(entry):
                return None
            ours.append(name)
        else:
            other.append(name)
    return NeverRan(tuple(ours), tuple(other))


def discard_if_never_ran(run_dir: Path, world_size: int) -> NeverRan | None:
    """After a failed job: remove the run folder if the job never logged a step and the
    folder holds only ltune's own files (``never_ran``). Returns what was found (``other``
    non-empty: nothing removed), or None when the job trained."""
    found = never_ran(run_dir, world_size)
    if found is None or found.other:
        return found
    for name in found.ours:
        path = run_dir / name
        if path.is_dir():
            path.rmdir()  # checkpoints/, empty (never_ran)
        else:
            path.unlink()
    run_dir.rmdir()
    return found


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """The dotted path of the first value that differs between two JSON-like trees."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            diff = first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
            if diff:
                return diff
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            diff = first_difference(x, y, f"{where}[{i}]")
            if diff:
                return diff
        return None
    return None if a == b else (where or "(top level)")


def check_same_plan(stored: Plan, given: Plan, run_dir: Path) -> None:
    """Resuming continues the stored run: the given plan must be the same job."""
    a = stored.model_dump(mode="json", exclude={"prediction"})
    b = given.model_dump(mode="json", exclude={"prediction"})
    diff = first_difference(a, b)
    if diff:
        raise LaunchError(
            f"--resume: the plan differs from {run_dir / PLAN_FILE} at {diff}; "
            f"resume with the run's own plan: ltune launch {run_dir / PLAN_FILE} --resume"
        )


def launch_files(
    plan: Plan, ds_config: Mapping[str, Any], command: Mapping[str, Any], sbatch: str | None
) -> dict[str, str]:
    """File name -> text of everything a launch writes."""
    files = {
        PLAN_FILE: plan_to_yaml(plan),
        DS_CONFIG_FILE: json.dumps(ds_config, indent=2) + "\n",
        COMMAND_FILE: json.dumps(command, indent=2) + "\n",
    }
    if sbatch is not None:
        files[SBATCH_FILE] = sbatch
    return files


def write_run_dir(run_dir: Path, files: Mapping[str, str]) -> None:
    """Write ``files`` as the new run folder, whole or not at all.

    A folder holding only an earlier launch's files (checked by check_fresh_run_dir) is
    replaced; its old content is removed only once the new folder is in place.
    """
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", suffix=".tmp", dir=run_dir.parent))
    old: Path | None = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a run folder is not
        for name, text in files.items():
            (tmp / name).write_text(text)
        if run_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", suffix=".old", dir=run_dir.parent))
            os.rmdir(old)
            os.rename(run_dir, old)
        os.rename(tmp, run_dir)
    except BaseException:
        if old is not None and not run_dir.exists():
            os.rename(old, run_dir)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
