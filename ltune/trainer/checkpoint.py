"""Checkpoints: DeepSpeed's own (model, optimizer, scheduler, loss scaler) plus our state.

Layout: RUN_DIR/checkpoints/step_<N>/ as written by ``engine.save_checkpoint`` (and
RUN_DIR/checkpoints/latest naming the newest tag), plus ``trainer_state_rank<r>.pt``
per rank: the step, and the Python/NumPy/torch RNG states. The data position needs no
state of its own: the packed stream is a pure function of (seed, step) (packing.py).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: Path, step: int) -> Path:
    """Save after ``step`` optimizer steps (all ranks call this)."""
    root = checkpoint_dir(run_dir)
    tag = f"step_{step}"
    engine.save_checkpoint(str(root), tag=tag, client_state={"ltune_step": step})
    path = root / tag
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "rng": _rng_state()}, path / f"trainer_state_rank{dist.get_rank()}.pt")
    dist.barrier()
    return path


def latest_tag(run_dir: Path) -> str | None:
    latest = checkpoint_dir(run_dir) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def load(engine, run_dir: Path) -> int | None:
    """Restore the latest checkpoint; the step to continue from, or None when there is none."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag)
    if path is None:
        raise RuntimeError(f"cannot load checkpoint {checkpoint_dir(run_dir) / tag}")
    state_file = checkpoint_dir(run_dir) / tag / f"trainer_state_rank{dist.get_rank()}.pt"
    if state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        _set_rng_state(state["rng"])
    return int(client_state["ltune_step"])
