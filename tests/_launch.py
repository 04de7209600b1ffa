"""Helpers for the trainer tests: tiny plans on the example data, and launching them.

Distributed runs go through the real path: ``ltune launch PLAN --run-dir DIR``
(DeepSpeed's launcher, 2 CPU processes over gloo).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-cpu"
TOKENIZER = EXAMPLE / "tokenizer"
DATA = EXAMPLE / "data"


def tiny_plan_dict(**overrides) -> dict:
    """The tiny-cpu example plan made smaller and faster, with absolute paths.

    overrides: {"layout": {...}, "training": {...}} merged into those sections.
    """
    plan = yaml.safe_load((EXAMPLE / "plan.yaml").read_text())
    plan["model"]["tokenizer"] = str(TOKENIZER)
    arch = plan["model"]["architecture"]
    arch.update(hidden_size=64, num_layers=2, intermediate_size=128)
    plan["training"].update(
        data=[str(DATA)], seq_len=128, max_steps=6, warmup_steps=1, checkpoint_every=0, log_every=1,
        learning_rate=0.003,
    )
    for section, values in overrides.items():
        plan[section].update(values)
    return plan


def write_plan(path: Path, plan: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def env(cache_dir: Path) -> dict:
    out = dict(os.environ)
    out["LTUNE_CACHE_DIR"] = str(cache_dir)
    out.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ltune/torch_extensions"))
    out["PYTHONUNBUFFERED"] = "1"
    return out


def launch_argv(plan_file: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", "from ltune.cli import app; app()", "launch", str(plan_file), "--run-dir", str(run_dir), "--force", *extra]


def launch(plan_file: Path, run_dir: Path, cache_dir: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        launch_argv(plan_file, run_dir, *extra), env=env(cache_dir), cwd=REPO,
        capture_output=True, text=True, timeout=timeout,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
