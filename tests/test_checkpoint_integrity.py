"""A checkpoint counts only when complete: kill a save at each point, resume exactly.

One trainer process (ZeRO-3, fp32, gloo world of 1) is started directly, without a
launcher, so each run costs a few seconds. The reference run saves at steps 2, 4 and 6;
each interrupted run dies inside the save of step 4 (tests/_kill_trainer.py), and its
resume must skip step_4, say why, continue after step 2 and log steps 3..6 exactly as
the reference did. The choice of checkpoint is also tested on its own, on folders.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _launch import REPO, env, read_metrics, tiny_plan_dict, write_plan
from conftest import fake_checkpoint, free_port

from ltune.job import checkpoints
from ltune.trainer import checkpoint

pytestmark = pytest.mark.distributed
KILL_RUNNER = Path(__file__).with_name("_kill_trainer.py")


def _plan(tmp_path: Path) -> dict:
    return tiny_plan_dict(layout={"num_gpus": 1, "zero_stage": 3},
                          training={"max_steps": 6, "checkpoint_every": 2, "precision": "fp32"})


def _run(run_dir: Path, cache: Path, point: str, *extra: str) -> subprocess.CompletedProcess:
    e = env(cache) | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return subprocess.run([sys.executable, str(KILL_RUNNER), point, "step_4", str(run_dir), *extra],
                          env=e, cwd=REPO, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = tmp / "run"
    write_plan(run_dir / "plan.yaml", _plan(tmp))
    done = _run(run_dir, tmp / "cache", "none")
    assert done.returncode == 0, done.stderr[-3000:]
    return read_metrics(run_dir), tmp / "cache"


@pytest.mark.parametrize("point", ["after_model", "after_optimizer", "before_marker"])
def test_kill_during_save_resumes_exactly(tmp_path, reference, point):
    ref_metrics, cache = reference
    run_dir = tmp_path / "run"
    write_plan(run_dir / "plan.yaml", _plan(tmp_path))
    killed = _run(run_dir, cache, point)
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert checkpoints.incomplete_reason(run_dir / "checkpoints" / "step_4", 1) is not None
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # a line torn by the kill, as a write cut short leaves it
    resumed = _run(run_dir, cache, "none", "--resume")
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert "skipping checkpoint step_4" in out and "continuing after step 2" in out, out[-3000:]
    assert "dropped 1 unreadable line" in out
    after = read_metrics(run_dir)
    assert [m["step"] for m in after] == list(range(1, 7))
    for old, new in zip(ref_metrics, after):
        assert new["loss"] == old["loss"] and new["grad_norm"] == old["grad_norm"], (point, old, new)
    assert checkpoints.incomplete_reason(run_dir / "checkpoints" / "step_6", 1) is None


# ---------------------------------------------------------------- choosing, on folders


def test_choose_skips_torn_checkpoints_newest_first(tmp_path):
    fake_checkpoint(tmp_path, 2)
    truncated = fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, marker=False)
    (truncated / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    (tmp_path / "checkpoints" / "latest").write_text("step_6")  # resume does not trust it
    tag, skipped = checkpoints.choose(tmp_path, 2)
    assert tag == "step_2"
    assert [t for t, _ in skipped] == ["step_6", "step_4"]
    assert "no completion marker" in skipped[0][1] and "10 bytes, 100 when saved" in skipped[1][1]


@pytest.mark.parametrize("damage, reason", [
    (lambda p: (p / "trainer_state_rank1.json").unlink(), "trainer_state_rank1.json is missing"),
    (lambda p: (p / checkpoints.MARKER).write_text("{not json"), "unreadable"),
])
def test_incomplete_reasons(tmp_path, damage, reason):
    path = fake_checkpoint(tmp_path, 2)
    assert checkpoints.incomplete_reason(path, 2) is None
    damage(path)
    assert reason in checkpoints.incomplete_reason(path, 2)
    assert "saved by 2 processes, this job has 4" in checkpoints.incomplete_reason(fake_checkpoint(tmp_path, 8), 4)


def test_rank_state_is_json_and_restores_rng(tmp_path):
    """No pickle: the state file is JSON, and restoring it replays the same random numbers."""
    import random

    import numpy as np
    import torch

    state = checkpoint._rng_state()
    json.dumps(state)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(3)
    checkpoint._set_rng_state(json.loads(json.dumps(state)))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
