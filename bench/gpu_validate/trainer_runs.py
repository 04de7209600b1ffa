"""trainer_runs: the real trainer on one GPU, its peak memory and speed beside the planner.

The ~1B llama shape (random init) at two context lengths, ZeRO-3, bf16, full recompute, run
by ``ltune.trainer``'s own entry point in a worker process (``_train RUN_DIR``) with a NCCL
world of 1. The only change to the trainer: the end-of-run checkpoint and HF export are
skipped (17 GB of optimizer state to disk would eat the call). Each run: ``measured`` (peaks
over the steps from metrics.jsonl, median step time and tokens/s/GPU after the first step)
beside ``predicted`` (``estimate_memory`` split into allocated/reserved/total), ``check_fit``
and ``trace`` (the CPU trace).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.gpu_validate.common import EXIT_OOM, outcome_of_exit, read_result, summarise_metrics, worker_argv, write_result
from bench.gpu_validate.configs import Config, trainer_config
from bench.gpu_validate.data import make_plan
from bench.gpu_validate.prediction import check_fit_summary, prediction
from bench.gpu_validate.traces import trace_for
from bench.gpu_validate.worker import cuda_memory, fake_oom_check, oom_text, single_rank_env

# ---------------------------------------------------------------- worker


def _patch_trainer() -> None:
    """Skip the trainer's end-of-run checkpoint and export; add --cpu-smoke's fake OOM to each step."""
    from ltune.trainer.loop import Trainer

    Trainer.save_checkpoint = lambda self: None
    Trainer.export = lambda self: None
    real_step = Trainer.train_step

    def train_step(self, batches):
        fake_oom_check(self.plan.training.seq_len)
        return real_step(self, batches)

    Trainer.train_step = train_step


def train(run_dir: str) -> int:
    """Worker: ``python -m ltune.trainer RUN_DIR`` with the end-of-run checkpoint and export skipped.

    Everything else is the trainer's own code: read_run_dir, check_inputs, join_process_group,
    prepare_data, build_engine, the steps and their metrics.jsonl. An OutOfMemoryError exits
    with EXIT_OOM and the peaks reached.
    """
    single_rank_env()
    import torch

    import ltune.trainer.__main__ as trainer_main

    _patch_trainer()
    folder = Path(run_dir)
    start = time.perf_counter()
    try:
        rc = trainer_main.main([run_dir])
    except torch.OutOfMemoryError as e:
        write_result(folder, {"oom": True, "error": oom_text(e), "wall_s": time.perf_counter() - start, **cuda_memory()})
        return EXIT_OOM
    write_result(folder, {"oom": False, "rc": rc, "wall_s": time.perf_counter() - start, **cuda_memory()})
    return rc


# ---------------------------------------------------------------- orchestrator (no CUDA)


def _read_metrics(run_dir: Path) -> list[dict] | None:
    """The trainer's metrics.jsonl records, None when it wrote none."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_training(runner, cfg: Config, steps: int, name: str, timeout_s: float) -> dict:
    """The trainer (worker ``_train``) on a fresh run folder: outcome, its metrics, its peaks."""
    run_dir = runner.run_dir_for(name)
    launch_env = runner.prepare_run_dir(cfg, run_dir, steps)
    runner.log(f"trainer {cfg.label}, {steps} step(s), timeout {timeout_s:.0f} s")
    rc, wall = runner.run_subprocess(worker_argv("_train", str(run_dir)),
                                     runner.job_env(launch_env, runner.fake_oom_cap("ltune")), timeout_s)
    result = {"config": cfg.key, "kind": "ltune", "rc": rc, "wall_s": round(wall, 1)}
    process, metrics = read_result(run_dir), _read_metrics(run_dir)
    if process is not None:
        result["process"] = process
    if metrics is not None:
        result["metrics"] = metrics
    result["outcome"] = outcome_of_exit(rc)
    step_times = [r["step_time_s"] for r in metrics or []]
    if result["outcome"] == "ok" and step_times:
        runner.overhead_s = max(5.0, wall - sum(step_times))
    runner.log(f"trainer {cfg.label}: {result['outcome']} in {wall:.1f} s")
    return result


def _needed_s(runner, steps: int, pred: dict) -> float:
    """Seconds a run should take: process overhead, the steps at the measured/predicted ratio, 50% and 30 s slack."""
    return runner.overhead_s + steps * pred["step_time_s"] * runner.step_time_ratio * 1.5 + 30


def _run_one(runner, cfg: Config, steps: int) -> dict:
    """One trainer run with the planner's figures beside it; refines the runner's step-time ratio."""
    pred = prediction(cfg, runner.gpu)
    need = _needed_s(runner, steps, pred)
    if need > runner.time_left():
        return {"config": cfg.key, "outcome": "skipped (budget)"}
    r = run_training(runner, cfg, steps, f"trainer-{cfg.seq_len}", min(runner.time_left(), max(need * 2, 120)))
    r["label"] = cfg.label
    r["predicted"] = pred
    r["check_fit"] = check_fit_summary(make_plan(cfg, runner.gpu.name, runner.data_dir, runner.run_dir_for("x"), steps))
    r["measured"] = summarise_metrics(r.get("metrics", []))
    r["trace"] = trace_for(cfg, runner.setup.smoke)
    if r["measured"].get("step_time_s") and pred["step_time_s"]:
        runner.step_time_ratio = max(0.5, r["measured"]["step_time_s"] / pred["step_time_s"])
        r["measured_over_predicted_step_time"] = round(runner.step_time_ratio, 3)
    return r


def run(runner) -> None:
    """The trainer at each of the setup's context lengths, results saved after each run."""
    rows: list[dict] = []
    runner.results["checks"]["trainer_runs"] = {"what": "ltune trainer, 1 GPU, ZeRO-3 bf16 full recompute", "runs": rows}
    for seq_len, steps in zip(runner.setup.trainer_seq_lens, runner.setup.trainer_steps):
        rows.append(_run_one(runner, trainer_config(runner.setup.model, seq_len), steps))
        runner.save()
