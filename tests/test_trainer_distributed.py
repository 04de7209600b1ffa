"""2-process runs through `ltune launch` (DeepSpeed launcher, gloo on CPU).

Three launches, each proving something different:
- ZeRO-3, 8 steps with a checkpoint at 4: the loss falls, the HF export loads;
  then a resume from step 4 reproduces steps 5..8 and the exported weights exactly;
- ZeRO-2, stopped by SIGTERM mid-run: the loss falls, a checkpoint is written on the
  way out and the job exits non-zero.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time

import pytest
from ltune.trainer import checkpoint
from _launch import REPO, env, launch, launch_argv, read_metrics, tiny_plan_dict, write_plan

pytestmark = pytest.mark.distributed


# the tiny plan's model counted by hand (hidden 64, 2 layers of 4 heads of 16, 2 kv heads, ffn 128,
# vocab 512, untied): embedding and output head, q o k v, gate up down, two norms a layer, final norm
TINY_PARAMS = 2 * 512 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
FLOPS_PER_TOKEN = 6 * TINY_PARAMS + 12 * 2 * 4 * 16 * 128  # PaLM appendix B at seq_len 128
CPU_PEAK_FLOPS = {"bf16": 0.05e12, "fp32": 0.25e12}  # the cpu profile's peaks
TOKENS_PER_STEP = 2 * 128  # 2 processes x micro batch 1 x 1 accumulation step x seq_len 128


def _check_step_metrics(metrics: list[dict], total_steps: int, precision: str) -> None:
    """lr from the warmup (1 step) and cosine schedule worked out by hand; tokens per step and MFU
    from the step time."""
    for m in metrics:
        # lr read before step s: warmup factor 1 at step 1, then cos over the 7 or 499 steps left
        done = m["step"] - 1
        factor = 1.0 if done == 0 else 0.5 * (1 + math.cos(math.pi * (done - 1) / (total_steps - 1)))
        assert m["lr"] == pytest.approx(0.003 * factor, rel=1e-9), m
        assert m["tokens_per_s_per_gpu"] * m["step_time_s"] * 2 == pytest.approx(TOKENS_PER_STEP, rel=1e-9), m
        expected_mfu = m["tokens_per_s_per_gpu"] * FLOPS_PER_TOKEN / CPU_PEAK_FLOPS[precision]
        assert m["mfu"] == pytest.approx(expected_mfu, rel=1e-9), m
        assert m["grad_norm"] > 0 and m["peak_rss_bytes"] > 0


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
    _check_step_metrics(metrics, 8, "bf16")
    assert metrics[-1]["lr"] == pytest.approx(0.003 * 0.5 * (1 + math.cos(math.pi * 6 / 7)), rel=1e-9)
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
    assert (run_dir / "checkpoints" / tag / "trainer_state_rank1.json").is_file()
    assert checkpoint.incomplete_reason(run_dir / "checkpoints" / tag, 2) is None
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, step + 1))
    assert _falls([m["loss"] for m in metrics], 0.3), metrics
    _check_step_metrics(metrics, 500, "fp32")
    assert not (run_dir / "hf_model").exists()  # stopped early: no export
    assert json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
