"""Which checkpoints of a run folder are complete (pure Python: no torch).

Layout: RUN_DIR/checkpoints/step_<N>/ holds DeepSpeed's files, ``trainer_state_rank<r>.json``
per rank, and last ``complete.json`` (the marker): written by rank 0 once every rank's files
are on disk, it lists every file of the checkpoint with its size.

A checkpoint counts only when its marker is there, names the job's process count, and every
file it lists has the size it had when saved. The trainer (``ltune.trainer.checkpoint``)
writes checkpoints and resumes from ``choose``'s pick; ``ltune launch --resume`` asks the
same function whether there is anything to resume from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
MARKER = "complete.json"
_TAG = re.compile(r"step_(\d+)\Z")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def rank_state_file(path: Path, rank: int) -> Path:
    return Path(path) / f"trainer_state_rank{rank}.json"


def manifest(path: Path, step: int, world_size: int) -> dict:
    """The marker's content: the step, the process count, and every file's size (bytes)."""
    files = {
        str(f.relative_to(path)): f.stat().st_size
        for f in sorted(Path(path).rglob("*"))
        if f.is_file() and f.name != MARKER and not f.name.endswith(".tmp")
    }
    return {"step": step, "world_size": world_size, "files": files}


def incomplete_reason(path: Path, world_size: int) -> str | None:
    """Why the checkpoint folder cannot be resumed from, or None when it is complete."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        return "no completion marker (the save did not finish)"
    try:
        info = json.loads(marker.read_text())
        files, saved_world = dict(info["files"]), int(info["world_size"])
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        return f"{MARKER} is unreadable"
    if saved_world != world_size:
        return f"saved by {saved_world} processes, this job has {world_size}"
    for rank in range(world_size):
        if rank_state_file(path, rank).name not in files:
            return f"{rank_state_file(path, rank).name} was not saved"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, {size} when saved (truncated or changed)"
    return None


def checkpoint_tags(run_dir: Path) -> list[str]:
    """The run's step_<N> checkpoint folders, newest (largest N) first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in root.iterdir() if (m := _TAG.match(p.name)) and p.is_dir()]
    return [name for _, name in sorted(found, reverse=True)]


def complete_tags(run_dir: Path, world_size: int) -> list[str]:
    """The run's complete checkpoints (``incomplete_reason`` None), newest first."""
    root = checkpoint_dir(run_dir)
    return [tag for tag in checkpoint_tags(run_dir) if incomplete_reason(root / tag, world_size) is None]


def prunable(run_dir: Path, world_size: int, keep_last: int) -> list[str]:
    """The complete checkpoints older than the newest ``keep_last`` complete ones (0: keep all).

    Only complete checkpoints count and only they are removed: the newest complete one is
    always kept, and a torn one (newer or older) is left as it is (resume skips it, naming why).
    """
    if keep_last <= 0:
        return []
    return complete_tags(run_dir, world_size)[keep_last:]


def choose(run_dir: Path, world_size: int) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete checkpoint's tag, and (tag, reason) for each newer one skipped."""
    root = checkpoint_dir(run_dir)
    skipped = []
    for tag in checkpoint_tags(run_dir):
        reason = incomplete_reason(root / tag, world_size)
        if reason is None:
            return tag, skipped
        skipped.append((tag, reason))
    return None, skipped
