"""2-process runs through `ltune launch` (DeepSpeed launcher, gloo on CPU).

Three launches, each proving something different:
- ZeRO-3, 8 steps with a checkpoint at 4: the loss falls, the HF export loads;
  then a resume from step 4 reproduces steps 5..8 and the exported weights exactly;
- ZeRO-2, stopped by SIGTERM mid-run: the loss falls, a checkpoint is written on the
  way out and the job exits non-zero.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import pytest
from _launch import REPO, env, launch, launch_argv, read_metrics, tiny_plan_dict, write_plan

pytestmark = pytest.mark.distributed


def _falls(losses: list[float], by: float) -> bool:
    return losses[-1] < losses[0] - by


def _tail(result) -> str:
    return (result.stdout + result.stderr)[-3000:]


def test_zero3_run_then_resume_reproduces_it(tmp_path):
    # bf16 here (the examples run fp32): DeepSpeed's mixed-precision ZeRO-3 path, saved and resumed
    plan = tiny_plan_dict(layout={"zero_stage": 3},
                          training={"max_steps": 8, "checkpoint_every": 4, "precision": "bf16"})
    plan_file = write_plan(tmp_path / "plan.yaml", plan)
    run_dir = tmp_path / "run"
    first = launch(plan_file, run_dir, tmp_path / "cache")
    assert first.returncode == 0, _tail(first)

    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    losses = [m["loss"] for m in metrics]
    assert _falls(losses, 1.0), losses
    for m in metrics:
        assert m["lr"] > 0 and m["grad_norm"] > 0 and m["tokens_per_s_per_gpu"] > 0
        assert m["peak_rss_bytes"] > 0
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_8"
    assert (ckpts / "step_4").is_dir()

    # the export is a plain HF folder
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")
    assert exported.config.num_hidden_layers == 2 and exported.config.use_cache
    assert len(AutoTokenizer.from_pretrained(run_dir / "hf_model")) == plan["model"]["architecture"]["vocab_size"]
    weights_first = load_file(run_dir / "hf_model" / "model.safetensors")

    # go back to step 4 as if the job had died after that checkpoint, and resume
    (ckpts / "latest").write_text("step_4")
    shutil.rmtree(ckpts / "step_8")
    shutil.rmtree(run_dir / "hf_model")
    resumed = launch(plan_file, run_dir, tmp_path / "cache", "--resume")
    assert resumed.returncode == 0, _tail(resumed)
    assert "resume: continuing after step 4" in resumed.stdout + resumed.stderr
    after = read_metrics(run_dir)
    assert [m["step"] for m in after] == list(range(1, 9))  # steps 5..8 replaced, not appended
    for old, new in zip(metrics[4:], after[4:]):
        assert new["loss"] == pytest.approx(old["loss"], rel=1e-6, abs=0), (old, new)
        assert new["grad_norm"] == pytest.approx(old["grad_norm"], rel=1e-5), (old, new)
        assert new["lr"] == pytest.approx(old["lr"], rel=1e-12)
    weights_resumed = load_file(run_dir / "hf_model" / "model.safetensors")
    assert weights_resumed.keys() == weights_first.keys()
    for name, tensor in weights_first.items():
        assert (weights_resumed[name].float() - tensor.float()).abs().max() <= 1e-6, name


def test_zero2_sigterm_checkpoints_and_stops(tmp_path):
    plan = tiny_plan_dict(layout={"zero_stage": 2}, training={"max_steps": 500})
    plan_file = write_plan(tmp_path / "plan.yaml", plan)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        launch_argv(plan_file, run_dir), env=env(tmp_path / "cache"), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    deadline = time.monotonic() + 240
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 4/500") or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines)
    assert proc.returncode != 0, output[-3000:]
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    step = int(tag.removeprefix("step_"))
    assert 4 <= step < 500, output[-3000:]
    assert (run_dir / "checkpoints" / tag / "trainer_state_rank1.pt").is_file()
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, step + 1))
    assert _falls([m["loss"] for m in metrics], 0.3), metrics
    assert not (run_dir / "hf_model").exists()  # stopped early: no export
    assert json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
