"""The checkpoint policy: predicted sizes against the files DeepSpeed writes, the save time and
interval worked out by hand, keep_last, and a save on Slurm's SIGUSR1.

Sizes are checked against a 2-process CPU run of DeepSpeed's own save_checkpoint at every ZeRO
stage in bf16 and fp32 (the files it writes, summed per rank); the 70B numbers against the
issue's "~850 GB for a 70B ZeRO-3 checkpoint".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from _launch import REPO, env, read_metrics, tiny_plan_dict, write_plan
from conftest import fake_checkpoint, free_port, make_plan

from ltune.job import checkpoints
from ltune.planner import checkpointing as ck
from ltune.planner.schema import Layout
from ltune.profiles import load_model
from ltune.trainer.loop import checkpoint_every_steps

# ---------------------------------------------------------------- sizes, by hand

# llama3.1-70b from its config.json (80 layers, hidden 8192, 64 heads of 128, 8 kv heads, ffn 28672,
# vocab 128256, untied): embeddings and head, q o (8192^2 each), k v (8192 x 1024 each), gate up down,
# 2 norms a layer, the final norm
LLAMA31_70B_PARAMS = (2 * 128256 * 8192 + 80 * (2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192)
                      + 8192)


def test_70b_zero3_checkpoint_on_64_h100s():
    """The issue's ~850 GB: 12 bytes (fp32 master + 2 fp32 Adam moments) per parameter, no 16-bit
    weights (ZeRO-3 saves placeholders); 1/64 per rank, 8 ranks a node, at 2 GB/s per node."""
    assert load_model("llama3.1-70b").num_params() == LLAMA31_70B_PARAMS
    layout = Layout(num_gpus=64, zero_stage=3, sp_degree=2)
    pred = ck.predict_checkpoint(LLAMA31_70B_PARAMS, layout, "bf16", 8, step_time_s=27.7)
    assert pred.total_bytes == 846_644_477_952  # 12 x 70,553,706,496
    assert pred.total_bytes / 1e9 == pytest.approx(850, rel=0.01)
    assert pred.max_rank_bytes == 12 * 1_102_401_664  # ceil(P / 64)
    assert pred.max_node_bytes == 8 * pred.max_rank_bytes
    assert pred.save_time_s == pytest.approx(52.9, abs=0.05)  # 105.8 GB / 2 GB/s
    assert pred.every_steps == 64  # 30 min / 27.7 s = 64.98 steps
    assert pred.stop_grace_s == 162  # 2 x (27.7 + 52.9) = 161.2, rounded up
    assert ck.slurm_signal_s(27.7, pred.save_time_s) == 162


@pytest.mark.parametrize("stage, precision, total_per_param", [
    (0, "bf16", 14), (1, "bf16", 14), (2, "bf16", 14), (3, "bf16", 12),
    (0, "fp32", 12), (1, "fp32", 16), (2, "fp32", 16), (3, "fp32", 12),
])
def test_total_bytes_per_parameter(stage, precision, total_per_param):
    """Model-dtype weights (2 or 4 bytes; none at ZeRO-3) + fp32 master (none at ZeRO-0 in fp32) + 8."""
    assert ck.checkpoint_total_bytes(1000, stage, precision) == 1000 * total_per_param


def test_interval_and_overrides():
    assert ck.every_steps(None, 30, 27.7) == 64
    assert ck.every_steps(None, 30, 3600.0) == 1  # a step longer than the interval: every step
    assert ck.every_steps(0, 30, 27.7) == 0  # checkpoint_every 0: only at the end
    assert ck.every_steps(5, 30, 27.7) == 5
    assert ck.stop_grace_s(1.0, 2.0) == 60  # the floor
    assert ck.slurm_signal_s(1.0, 2.0) == 120  # the floor
    assert ck.slurm_signal_s(1.0, 10**6) == 65535  # sbatch's ceiling


def test_trainer_interval_comes_from_the_plan():
    """The trainer's interval: checkpoint_every when set; else checkpoint_minutes of the stored step time."""
    from ltune.planner.schema import MemoryBreakdown, Prediction, Throughput

    plan = make_plan(training={"checkpoint_minutes": 10})
    assert checkpoint_every_steps(plan) == 0  # no prediction: only at the end
    mem = MemoryBreakdown(terms={}, total_bytes=1, capacity_bytes=2, usable_bytes=2)
    th = Throughput(step_time_s=45.0, tokens_per_s_per_gpu=1, mfu=0.1, compute_s=1, exposed_comm_s=0,
                    flops_per_token=1)
    plan = plan.model_copy(update={"prediction": Prediction(memory=mem, throughput=th, safety_margin=0.05)})
    assert checkpoint_every_steps(plan) == 13  # 600 s / 45 s
    pinned = plan.model_copy(update={"training": plan.training.model_copy(update={"checkpoint_every": 7})})
    assert checkpoint_every_steps(pinned) == 7


# ---------------------------------------------------------------- keep_last, on folders


def test_prunable_counts_only_complete_checkpoints(tmp_path):
    for step in (2, 4, 6, 10):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 8, marker=False)  # torn, between complete ones
    fake_checkpoint(tmp_path, 12, marker=False)  # torn, the newest
    assert checkpoints.prunable(tmp_path, 2, keep_last=2) == ["step_4", "step_2"]  # keeps 10 and 6
    assert checkpoints.prunable(tmp_path, 2, keep_last=1) == ["step_6", "step_4", "step_2"]
    assert checkpoints.prunable(tmp_path, 2, keep_last=0) == []  # 0 keeps all
    assert checkpoints.prunable(tmp_path, 2, keep_last=9) == []
    from ltune.trainer import checkpoint

    assert checkpoint.prune(tmp_path, 2, 2) == ["step_4", "step_2"]
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step_10", "step_12", "step_6", "step_8"]  # torn ones are left as they are
    assert checkpoints.choose(tmp_path, 2)[0] == "step_10"


# ---------------------------------------------------------------- against DeepSpeed's files

SAVE_SCRIPT = r'''
import json, sys, torch, deepspeed, torch.distributed as dist
from pathlib import Path
out = Path(sys.argv[-1])
deepspeed.init_distributed()
torch.set_num_threads(1)
rank = dist.get_rank()
for prec in ("bf16", "fp32"):
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(512, 1024, bias=False), torch.nn.Linear(1024, 1000),
                                    torch.nn.LayerNorm(1000))
        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2,
               "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "bf16": {"enabled": prec == "bf16"}}
        eng, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
        x = torch.randn(1, 512, dtype=torch.bfloat16 if prec == "bf16" else torch.float32)
        eng.backward(eng(x).float().pow(2).mean()); eng.step()
        d = out / f"{prec}_z{stage}"
        eng.save_checkpoint(str(d), tag="t", save_latest=False)
        dist.barrier()
        if rank == 0:
            sizes = {f.name: f.stat().st_size for f in (d / "t").iterdir()}
            (out / f"{prec}_z{stage}.json").write_text(json.dumps(sizes))
'''
MEASURED_PARAMS = 512 * 1024 + 1024 * 1000 + 1000 + 2 * 1000


@pytest.fixture(scope="module")
def deepspeed_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds_sizes")
    script = tmp / "save.py"
    script.write_text(SAVE_SCRIPT)
    e = env(tmp / "cache") | {"DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                           "--master_port", str(free_port()), str(script), str(tmp)],
                          env=e, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {p.stem: json.loads(p.read_text()) for p in tmp.glob("*.json")}


def _rank_bytes(files: dict[str, int], rank: int) -> int:
    """A rank's files: zero_pp_rank_<r> files, and rank 0's mp_rank_00_model_states.pt."""
    return sum(size for name, size in files.items()
               if f"zero_pp_rank_{rank}_" in name or (rank == 0 and name == "mp_rank_00_model_states.pt"))


@pytest.mark.distributed
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_predicted_bytes_match_deepspeeds_files(deepspeed_files, stage, precision):
    """Rank 0's files (the busiest rank) within 0.5% + 16 KB of pickle framing of the prediction."""
    files = deepspeed_files[f"{precision}_z{stage}"]
    measured = _rank_bytes(files, 0)
    predicted = ck.rank_bytes(MEASURED_PARAMS, stage, precision, 2, 0)
    assert abs(measured - predicted) <= 0.005 * predicted + 16384, (files, predicted)


# ---------------------------------------------------------------- the trainer on SIGUSR1


@pytest.mark.distributed
def test_sigusr1_saves_exits_and_keeps_the_last_two(tmp_path):
    """One trainer process (ZeRO-3, fp32) checkpointing every step with keep_last 2 gets SIGUSR1
    mid-run: it saves, exits 143, and leaves exactly the two newest complete checkpoints."""
    run_dir = tmp_path / "run"
    plan = tiny_plan_dict(layout={"num_gpus": 1, "zero_stage": 3},
                          training={"max_steps": 500, "checkpoint_every": 1, "keep_last": 2, "precision": "fp32"})
    write_plan(run_dir / "plan.yaml", plan)
    e = env(tmp_path / "cache") | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.Popen([sys.executable, "-m", "ltune.trainer", str(run_dir)], env=e, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    os.kill(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    last = read_metrics(run_dir)[-1]["step"]
    assert 4 <= last < 500
    assert checkpoints.complete_tags(run_dir, 1) == [f"step_{last}", f"step_{last - 1}"]
    assert checkpoints.checkpoint_tags(run_dir) == [f"step_{last}", f"step_{last - 1}"]
    assert "removed step_" in out
