"""memory_matrix: peak memory of single-GPU configurations beside the planner's terms and the CPU trace.

Two models, several contexts, recompute on/off, loss full/chunked, ZeRO-0/3 (configs.py); the
trainer's own steps for each, all configurations in one worker process (``_memory_matrix``).
Per row: ``measured`` (peaks of the steps, the allocator's baseline before the row),
``predicted``, ``trace``, ``summary`` (allocated error %, reserved/allocated); over the rows,
``reserved_over_allocated`` min/median/max for the planner's fragmentation term.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.gpu_validate.common import median, worker_argv
from bench.gpu_validate.configs import Config
from bench.gpu_validate.prediction import prediction
from bench.gpu_validate.traces import trace_for
from bench.gpu_validate.worker import cuda_memory, error_text, fake_oom_check, oom_text, release_memory, single_rank_env

STEP_KEYS = ("step", "loss", "step_time_s", "tokens_per_s_per_gpu")

# ---------------------------------------------------------------- worker


def _built_trainer(run_dir: str):
    """The trainer of a run folder up to its engine, by its own methods."""
    from ltune.trainer.loop import Trainer

    trainer = Trainer(run_dir)
    trainer.read_run_dir()
    trainer.check_inputs()
    trainer.join_process_group()
    trainer.prepare_data()
    trainer.build_engine()
    return trainer


def _train_steps(trainer, steps: int) -> list[dict]:
    """``steps`` trainer steps, each record with the allocator's figures after it."""
    records = []
    for _ in range(steps):
        fake_oom_check(trainer.plan.training.seq_len)
        record = trainer.train_step(trainer.next_batches())
        records.append({k: record[k] for k in STEP_KEYS} | cuda_memory())
    return records


def _destroy(trainer, row: dict) -> None:
    """Free a configuration's engine before the next one (an error is recorded, not raised)."""
    if trainer is None or getattr(trainer, "engine", None) is None:
        return
    try:
        trainer.engine.destroy()
    except Exception as e:  # noqa: BLE001
        row["destroy_error"] = error_text(e, 200)


def _measure_row(job: dict, cuda: bool) -> dict:
    """One configuration: baseline, engine, steps, peaks; then its engine freed and the residual."""
    import torch

    row: dict = {"key": job["key"], "run_dir": job["run_dir"]}
    trainer = None
    t0 = time.perf_counter()
    try:
        release_memory(reset_peaks=True)
        if cuda:
            row["baseline_allocated_bytes"] = torch.cuda.memory_allocated()
            row["baseline_reserved_bytes"] = torch.cuda.memory_reserved()
        trainer = _built_trainer(job["run_dir"])
        row["after_init"] = cuda_memory()
        row["steps"] = _train_steps(trainer, job["steps"])
        row["outcome"] = "ok"
    except torch.OutOfMemoryError as e:
        row.update(outcome="oom", error=oom_text(e))
    except Exception as e:  # noqa: BLE001 - recorded, the next configuration still runs
        row.update(outcome="error", error=error_text(e))
    row.update(cuda_memory())
    row["wall_s"] = time.perf_counter() - t0
    _destroy(trainer, row)
    del trainer
    release_memory(reset_peaks=False)
    if cuda:
        row["residual_allocated_bytes"] = torch.cuda.memory_allocated()
    return row


def measure(spec_file: str, out_file: str) -> int:
    """Worker: the trainer's steps for each run folder of spec_file, all in this process, one JSON line per configuration.

    Between configurations the engine is destroyed and the allocator emptied; the bytes still
    allocated before a configuration (``baseline``) are recorded and subtracted, so a leak
    shows instead of inflating the next row.
    """
    single_rank_env()
    import torch

    jobs = json.loads(Path(spec_file).read_text())
    cuda = torch.cuda.is_available()
    with open(out_file, "a") as out:
        for job in jobs:
            row = _measure_row(job, cuda)
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"matrix: {job['key']}: {row['outcome']} ({row['wall_s']:.1f} s)", flush=True)
    return 0


# ---------------------------------------------------------------- orchestrator (no CUDA)


def summary(measured: dict, pred: dict) -> dict:
    """A row's peaks less its baseline, the planner's allocated error in %, reserved/allocated."""
    if measured.get("outcome") != "ok":
        return {"outcome": measured.get("outcome")}
    alloc = measured.get("peak_allocated_bytes")
    res = measured.get("peak_reserved_bytes")
    out = {"outcome": "ok"}
    if alloc is not None:
        alloc -= measured.get("baseline_allocated_bytes", 0)
        out.update(peak_allocated_bytes=alloc, peak_reserved_bytes=res,
                   allocated_error_pct=round(100 * (pred["allocated_bytes"] - alloc) / alloc, 2),
                   reserved_over_allocated=round(res / alloc, 4) if alloc else None)
    return out


def reserved_over_allocated_range(rows: list[dict]) -> dict:
    """min / median / max of the rows' reserved/allocated ratios (empty when no row has one)."""
    vals = [r["summary"]["reserved_over_allocated"] for r in rows if r["summary"].get("reserved_over_allocated")]
    if not vals:
        return {}
    return {"min": min(vals), "max": max(vals), "median": median(vals)}


def _write_jobs(runner) -> tuple[list[dict], dict[str, tuple[Config, dict]]]:
    """A run folder per configuration; the worker's job list and the planner's prediction per key."""
    jobs, preds = [], {}
    for i, cfg in enumerate(runner.setup.matrix):
        run_dir = runner.run_dir_for(f"matrix-{i}")
        runner.prepare_run_dir(cfg, run_dir, runner.setup.matrix_steps)
        jobs.append({"key": cfg.key, "run_dir": str(run_dir), "steps": runner.setup.matrix_steps})
        preds[cfg.key] = (cfg, prediction(cfg, runner.gpu))
    return jobs, preds


def _read_rows(out_file: Path) -> dict[str, dict]:
    """The worker's JSON lines, by configuration key."""
    if not out_file.is_file():
        return {}
    rows = (json.loads(line) for line in out_file.read_text().splitlines())
    return {row["key"]: row for row in rows}


def run(runner) -> None:
    """Every configuration in one worker process, under the matrix's own time limit."""
    jobs, preds = _write_jobs(runner)
    spec, out_file = runner.work / "matrix_jobs.json", runner.work / "matrix.jsonl"
    spec.write_text(json.dumps(jobs))
    timeout = min(runner.time_left() - 30, runner.args.matrix_budget_s)
    runner.log(f"matrix: {len(jobs)} configurations in one process, timeout {timeout:.0f} s")
    rc, wall = runner.run_subprocess(worker_argv("_memory_matrix", str(spec), str(out_file)), runner.job_env({}, None), timeout)
    measured = _read_rows(out_file)
    rows = []
    for key, (cfg, pred) in preds.items():
        m = measured.get(key, {"outcome": "not run" if rc == 0 else f"not run (matrix rc={rc})"})
        rows.append({"config": key, "label": cfg.label, "measured": m, "predicted": pred,
                     "trace": trace_for(cfg, runner.setup.smoke), "summary": summary(m, pred)})
    runner.results["checks"]["memory_matrix"] = {
        "what": "single-GPU memory matrix, trainer steps in one process",
        "rc": rc, "wall_s": round(wall, 1), "rows": rows, "reserved_over_allocated": reserved_over_allocated_range(rows),
    }
