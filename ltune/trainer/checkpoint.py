"""Checkpoints: DeepSpeed's own (model, optimizer, scheduler, loss scaler) plus our state.

Layout: RUN_DIR/checkpoints/step_<N>/ as written by ``engine.save_checkpoint``, plus
``trainer_state_rank<r>.json`` per rank (the step, and the Python/NumPy/torch RNG states
as plain numbers: JSON, so loading it runs no code), and last ``complete.json``: written by
rank 0 after a barrier, once every rank's files are on disk, listing every file of the
checkpoint with its size. RUN_DIR/checkpoints/latest names the newest tag (written after
the marker; informational: resume does not trust it).

A checkpoint counts only when its marker is there, names the job's process count, and
every file it lists has the size it had when saved: a save cut short anywhere (after the
model files, after the optimizer files, before the marker) or a file truncated since is
skipped, and the resume takes the newest complete one. That decision is
``ltune.job.checkpoints`` (no torch), which ``ltune launch --resume`` asks too.

DeepSpeed's own files are pickles loaded with ``torch.load(weights_only=False)`` (its
checkpoint engine): resume only from run folders you wrote.

The data position needs no state of its own: the packed stream is a pure function of
(seed, step) (packing.py).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# which checkpoints are complete is decided without torch (the launcher asks too)
from ..job.checkpoints import MARKER, checkpoint_dir, choose, incomplete_reason, manifest, prunable, rank_state_file

__all__ = ["MARKER", "checkpoint_dir", "choose", "incomplete_reason", "load", "prune", "rank_state_file", "save"]


# ---------------------------------------------------------------- RNG state as data


def _rng_state() -> dict:
    """The RNG states as JSON-ready numbers (no pickles)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _write_atomic(path: Path, text: str) -> None:
    """Write a small file so that a reader sees the old content or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- save


def _write_rank_state(path: Path, step: int, rank: int) -> None:
    _write_atomic(rank_state_file(path, rank), json.dumps({"step": step, "rng": _rng_state()}))


def _write_marker(path: Path, step: int, world_size: int) -> None:
    _write_atomic(path / MARKER, json.dumps(manifest(path, step, world_size), indent=1))


def save(engine, run_dir: Path, step: int, adapters: bool = False) -> Path:
    """Save after ``step`` optimizer steps (all ranks call this); complete when it returns.

    adapters (LoRA, QLoRA): the frozen weights are left out (``exclude_frozen_parameters``): the
    checkpoint holds the adapters and their optimizer state; the base is the plan's model again."""
    root = checkpoint_dir(run_dir)
    tag = f"step_{step}"
    path = root / tag
    engine.save_checkpoint(str(root), tag=tag, client_state={"ltune_step": step}, save_latest=False,
                           exclude_frozen_parameters=adapters)
    path.mkdir(parents=True, exist_ok=True)
    _write_rank_state(path, step, dist.get_rank())
    dist.barrier()  # every rank's files are written
    if dist.get_rank() == 0:
        _write_marker(path, step, dist.get_world_size())
        _write_atomic(root / "latest", tag)
    dist.barrier()
    return path


def prune(run_dir: Path, world_size: int, keep_last: int) -> list[str]:
    """Remove the complete checkpoints older than the newest ``keep_last`` (``prunable``); rank 0
    calls it after a save is complete. Each loses its marker first, so a removal cut short leaves
    a folder that no longer counts as complete. Returns the tags removed."""
    import shutil

    root = checkpoint_dir(run_dir)
    removed = []
    for tag in prunable(run_dir, world_size, keep_last):
        (root / tag / MARKER).unlink(missing_ok=True)
        shutil.rmtree(root / tag, ignore_errors=True)
        removed.append(tag)
    return removed


# ---------------------------------------------------------------- choose and load


def load(engine, run_dir: Path, adapters: bool = False) -> tuple[int | None, list[tuple[str, str]]]:
    """Restore the newest complete checkpoint (rank 0 decides for all).

    adapters: the checkpoint lacks the frozen weights (``save``), so the module's state loads
    non-strictly (``load_module_strict=False``); the frozen weights are the plan's model, built again.

    Returns the step to continue after (None when no checkpoint is complete) and the
    newer checkpoints skipped, with why."""
    decision = [choose(run_dir, dist.get_world_size()) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(decision, src=0)
    tag, skipped = decision[0]
    if tag is None:
        return None, skipped
    root = checkpoint_dir(run_dir)
    path, client_state = engine.load_checkpoint(str(root), tag=tag, load_module_strict=not adapters)
    if path is None:
        raise RuntimeError(f"cannot load checkpoint {root / tag}")
    state = json.loads(rank_state_file(root / tag, dist.get_rank()).read_text())
    _set_rng_state(state["rng"])
    return int(client_state["ltune_step"]), skipped
