"""The run folder: what a launch writes before anything starts, whole or not at all.

RUN_DIR/plan.yaml        the plan, paths made absolute, training.output_dir = RUN_DIR
RUN_DIR/ds_config.json   build_ds_config(plan)
RUN_DIR/command.json     {"argv": [...], "env": {...}, "cwd": "..."}
RUN_DIR/launch.sbatch    (--launcher slurm only)

Files are written into a temporary sibling folder that is renamed into place, so an
error leaves no half-written run folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from ..job.paths import DS_CONFIG_FILE, PLAN_FILE, resolve_plan_paths  # the trainer applies the same rule to RUN_DIR/plan.yaml
from ..planner.io import plan_to_yaml
from ..planner.schema import Plan
from .errors import LaunchError

COMMAND_FILE = "command.json"
SBATCH_FILE = "launch.sbatch"
CHECKPOINTS_DIR = "checkpoints"
LAUNCH_FILES = frozenset({PLAN_FILE, DS_CONFIG_FILE, COMMAND_FILE, SBATCH_FILE})


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
    """``--resume``: the folder must exist and hold checkpoints/; returns its stored plan."""
    from ..planner.io import PlanError, load_plan

    ckpt = run_dir / CHECKPOINTS_DIR
    if not run_dir.is_dir():
        raise LaunchError(f"--resume: run folder {run_dir} does not exist")
    if not ckpt.is_dir() or not any(ckpt.iterdir()):
        raise LaunchError(f"--resume: run folder {run_dir} holds no checkpoint in {CHECKPOINTS_DIR}/")
    try:
        return load_plan(run_dir / PLAN_FILE)
    except PlanError as e:
        raise LaunchError(f"--resume: {e}") from None


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
