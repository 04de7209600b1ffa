"""The real path: `ltune launch examples/tiny-cpu/plan.yaml` and `examples/tiny-cpu-sp2/plan.yaml`
through DeepSpeed's launcher on 2 CPU processes (gloo), the trainer to its end. One test, because
it costs a minute and a half: the sp 2 + chunked-loss job must give the tiny-cpu job's per-step
losses to 1e-4 (absolute, every step): splitting the sequence over 2 ranks and chunking the loss
must not change what is trained."""

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
EXAMPLE_SP2 = ROOT / "examples" / "tiny-cpu-sp2" / "plan.yaml"


def _launch(plan: Path, run_dir: Path, cwd: Path) -> None:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ltune/torch_extensions"))
    proc = subprocess.run(
        [sys.executable, "-c", "from ltune.cli import app; app()", "launch", str(plan), "--run-dir", str(run_dir)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.distributed
def test_launch_tiny_cpu_examples_to_the_end(tmp_path):
    run_dir = tmp_path / "run"
    _launch(EXAMPLE, run_dir, tmp_path)

    # the run folder holds what the launch wrote, and the command it ran
    command = json.loads((run_dir / "command.json").read_text())
    assert command["argv"][1:4] == ["-m", "deepspeed.launcher.runner", "--num_gpus"]
    assert command["env"]["DS_ACCELERATOR"] == "cpu"
    # DeepSpeed's CPU all-reduce buffers (64 MiB of host memory per rank) are gone with the job
    port = command["argv"][command["argv"].index("--master_port") + 1]
    leftover = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert not leftover, leftover

    max_steps = load_plan(EXAMPLE).training.max_steps
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, max_steps + 1)), "one metrics line per step"
    losses = [r["loss"] for r in records if "loss" in r]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, f"loss did not fall: first 10 steps {first:.3f}, last 10 {last:.3f}"

    # the same job with Ulysses sp 2 and the chunked loss: the same losses, step by step
    sp2_dir = tmp_path / "run-sp2"
    _launch(EXAMPLE_SP2, sp2_dir, tmp_path)
    plan_sp2 = load_plan(EXAMPLE_SP2)
    assert (plan_sp2.layout.sp_degree, plan_sp2.layout.loss) == (2, "chunked")
    assert json.loads((sp2_dir / "ds_config.json").read_text())["sequence_parallel_size"] == 2
    sp1, sp2 = _losses(run_dir), _losses(sp2_dir)
    assert sorted(sp2) == sorted(sp1)
    worst = max(sp1, key=lambda step: abs(sp1[step] - sp2[step]))
    assert abs(sp1[worst] - sp2[worst]) <= 1e-4, (worst, sp1[worst], sp2[worst])


EXAMPLE_QWEN3 = ROOT / "examples" / "tiny-cpu-qwen3" / "plan.yaml"


@pytest.mark.distributed
def test_launch_tiny_qwen3_trains_and_exports_a_qwen3(tmp_path):
    """A newer family end to end: the qwen3-shaped example (q/k norms, head_dim 64 with
    hidden 128, tied embeddings, ZeRO-3) on 2 CPU processes: one metrics line per step, the loss
    falling, and the exported folder a Qwen3 model with its q/k norm weights."""
    from safetensors import safe_open

    run_dir = tmp_path / "run"
    _launch(EXAMPLE_QWEN3, run_dir, tmp_path)
    plan = load_plan(EXAMPLE_QWEN3)
    assert plan.model.architecture.family == "qwen3"
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, plan.training.max_steps + 1))
    values = [losses[step] for step in sorted(losses)]
    first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
    assert last < 0.5 * first, f"loss did not fall: first 10 steps {first:.3f}, last 10 {last:.3f}"
    exported = run_dir / "hf_model"
    config = json.loads((exported / "config.json").read_text())
    assert (config["model_type"], config["head_dim"], config["tie_word_embeddings"]) == ("qwen3", 64, True)
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.3.self_attn.k_norm.weight"} <= keys
