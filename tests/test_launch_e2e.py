"""The real path: `ltune launch examples/tiny-cpu/plan.yaml` through DeepSpeed's launcher on
2 CPU processes (gloo), the trainer to its end. One test, because it costs a minute or two."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ltune.planner.io import load_plan

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tiny-cpu" / "plan.yaml"


@pytest.mark.distributed
def test_launch_tiny_cpu_example_to_the_end(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ltune/torch_extensions"))
    proc = subprocess.run(
        [sys.executable, "-c", "from ltune.cli import app; app()", "launch", str(EXAMPLE), "--run-dir", str(run_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # the run folder holds what the launch wrote, and the command it ran
    command = json.loads((run_dir / "command.json").read_text())
    assert command["argv"][1:4] == ["-m", "deepspeed.launcher.runner", "--num_gpus"]
    assert command["env"]["DS_ACCELERATOR"] == "cpu"

    max_steps = load_plan(EXAMPLE).training.max_steps
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, max_steps + 1)), "one metrics line per step"
    losses = [r["loss"] for r in records if "loss" in r]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, f"loss did not fall: first 10 steps {first:.3f}, last 10 {last:.3f}"
