"""memory_matrix: peak memory of single-GPU configurations beside the planner's terms and the CPU trace.

The layouts the planner recommends (configs.layout_rows, most informative first: ZeRO-3 with
optimizer and full offload, ZeRO-2, ZeRO-1, sp 2 (trace only, SP_ON_ONE_GPU), micro-batch 2,
chunked and full loss), then the older rows (two models, several contexts, recompute on/off,
loss full/chunked, ZeRO-0/3); the trainer's own steps for each, all configurations in one worker
process (``_memory_matrix``), in order, so a run cut short keeps the first rows.
Per row: ``measured`` (peaks of the steps, the allocator's baseline before the row, allocated
after init and after each step, nvidia-smi's per-process figure, the optimizer's classes, the
batch shape), ``predicted``, ``trace``, ``summary`` (allocated error %, reserved/allocated),
``groups`` (predicted vs measured per term group, see term_groups), ``note`` (what the row
checks) and ``estimated_s``; over the rows, ``reserved_over_allocated`` min/median/max for
the planner's fragmentation term.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.gpu_validate.common import MIB, RESERVE_TERMS, median, nvidia_smi, worker_argv
from bench.gpu_validate.configs import Config
from bench.gpu_validate.prediction import prediction
from bench.gpu_validate.traces import trace_for
from bench.gpu_validate.worker import (
    cuda_memory, error_text, fake_oom_check, oom_text, release_memory, single_rank_env, trainer_with_data,
)

STEP_KEYS = ("step", "loss", "step_time_s", "tokens_per_s_per_gpu", "loss_tokens")

#: why the sp 2 row is a trace and not a measurement
SP_ON_ONE_GPU = (
    "not run: Ulysses needs one process per sp rank, and two processes cannot share one GPU in a "
    "process group: NCCL refuses two ranks on one device ('Duplicate GPU detected', ncclInvalidUsage), "
    "and gloo has no reduce-scatter nor all-to-all for CUDA tensors, which ZeRO-3 and Ulysses need; "
    "the per-rank activations are ltune.trace's (seq_len/sp tokens per rank), beside the planner's"
)

#: planner terms of each group (the reserve is RESERVE_TERMS)
STATE_TERMS = ("weights", "gradients", "gradients_fp32", "master_weights", "optimizer_states")
PERSISTENT_STATE_TERMS = ("weights", "master_weights", "optimizer_states")  # live between steps
ACTIVATION_TERMS = ("activations_checkpoints", "activations_layer", "logits_loss")

# ---------------------------------------------------------------- worker


def _train_steps(trainer, steps: int) -> list[dict]:
    """``steps`` trainer steps, each record with the allocator's figures after it and the batch's shape."""
    records = []
    for _ in range(steps):
        fake_oom_check(trainer.plan.training.seq_len)
        batches = trainer.next_batches()
        record = trainer.train_step(batches)
        shape = {"micro_batches": len(batches), "input_ids_shape": list(batches[0]["input_ids"].shape)}
        records.append({k: record[k] for k in STEP_KEYS if k in record} | shape | cuda_memory())
    return records


def _optimizer_classes(trainer) -> dict:
    """The engine's optimizer wrapper and the basic optimizer inside it (DeepSpeedCPUAdam under offload)."""
    wrapper = getattr(trainer.engine, "optimizer", None)
    inner = getattr(wrapper, "optimizer", None)
    return {"optimizer_wrapper": type(wrapper).__name__, "optimizer": type(inner if inner is not None else wrapper).__name__}


def _nvidia_smi_process_bytes() -> int | None:
    """nvidia-smi's used memory of this process (CUDA context and the allocator's segments), None without it."""
    import os

    rows = nvidia_smi("compute-apps=pid,used_memory")
    for row in rows or []:
        pid, _, used = (x.strip() for x in row.partition(","))
        if pid == str(os.getpid()) and used.isdigit():
            return int(used) * MIB
    return None


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
        trainer = trainer_with_data(job["run_dir"], engine=True)
        row["after_init"] = cuda_memory()
        row.update(_optimizer_classes(trainer))
        row["steps"] = _train_steps(trainer, job["steps"])
        row["outcome"] = "ok"
        if cuda:
            row["nvidia_smi_process_bytes"] = _nvidia_smi_process_bytes()
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


def _persistent_buffers_bytes(cfg: Config) -> int:
    """The planner's ZeRO buffers between steps (its ``step`` moment: the ipg bucket under ZeRO-3, none under ZeRO 0-2)."""
    from ltune.planner.memory import zero_buffers_bytes
    from ltune.planner.shape import Shape

    return zero_buffers_bytes(Shape.of(cfg.model, cfg.seq_len, "bf16", cfg.loss_chunk_tokens), cfg.layout(), "step")


def _pair(predicted: int, measured: int | None) -> dict:
    """Predicted and measured bytes of one group, and the planner's error in % of the measured."""
    out = {"predicted": predicted, "measured": measured}
    if measured:
        out["error_pct"] = round(100 * (predicted - measured) / measured, 2)
    return out


def term_groups(measured: dict, pred: dict, persistent_buffers_bytes: int) -> dict:
    """Predicted vs measured per term group, so that a miss points at a term.

    The allocator separates what lives between steps from what a step adds, not states from
    buffers; so, in bytes, less the row's baseline:

    - ``model_states_and_buffers``: allocated after the last step; predicted weights + fp32
      master + Adam moments (GPU-resident) + the ZeRO buffers kept between steps
      (``predicted_split`` gives the planner's states and buffers apart);
    - ``optimizer_states``: allocated after the first step less after init (DeepSpeed makes
      Adam's moments at the first step; 0 predicted when offloaded);
    - ``activations_and_loss``: the peak over what lives between steps; predicted the peak
      moment's activations, logits/loss, gradients (bf16 and fp32) and its extra ZeRO buffers;
    - ``fragmentation``: peak reserved less peak allocated;
    - ``outside_allocator``: the device's used memory less peak reserved (CUDA context,
      cuBLAS workspace, NCCL), beside cuda_context + comm_buffers; nvidia-smi's process figure too.
    Measured values are None on CPU (no allocator statistics) or when the row did not train.
    """
    terms = pred["terms"]
    states = sum(terms.get(k, 0) for k in PERSISTENT_STATE_TERMS)
    persistent = states + persistent_buffers_bytes
    steps = measured.get("steps") or []
    ok = measured.get("outcome") == "ok" and steps and "allocated_bytes" in steps[-1]
    base = measured.get("baseline_allocated_bytes", 0)
    m_persistent = steps[-1]["allocated_bytes"] - base if ok else None
    m_moments = steps[0]["allocated_bytes"] - measured["after_init"]["allocated_bytes"] if ok else None
    m_peak = measured["peak_allocated_bytes"] - base if ok else None
    m_reserved = measured.get("peak_reserved_bytes") if ok else None
    m_used = measured.get("device_used_bytes") if ok else None
    return {
        "model_states_and_buffers": _pair(persistent, m_persistent),
        "predicted_split": {"model_states": states, "buffers": persistent_buffers_bytes,
                            "model_states_at_peak": sum(terms.get(k, 0) for k in STATE_TERMS),
                            "buffers_at_peak": terms.get("zero_buffers", 0),
                            "activations_and_loss_at_peak": sum(terms.get(k, 0) for k in ACTIVATION_TERMS)},
        "optimizer_states": _pair(terms.get("optimizer_states", 0), m_moments),
        "activations_and_loss": _pair(pred["allocated_bytes"] - persistent, None if m_peak is None else m_peak - m_persistent),
        "fragmentation": _pair(terms.get("fragmentation", 0),
                               None if m_reserved is None else m_reserved - measured["peak_allocated_bytes"]),
        "outside_allocator": _pair(sum(terms.get(k, 0) for k in RESERVE_TERMS if k != "fragmentation"),
                                   None if m_used is None or m_reserved is None else m_used - m_reserved)
        | {"nvidia_smi_process_bytes": measured.get("nvidia_smi_process_bytes")},
    }


# Seconds of one row on the GPU: engine build (DeepSpeed init, random init) + per billion
# parameters (init, the engine's flat buffers) + the steps at ROW_STEP_RATIO x the planner's step
# time (which counts CPU Adam under offload); under offload, pinning the host states too.
# Assumptions until a device run's per-row wall_s replaces them.
ROW_BUILD_S = 8.0
ROW_S_PER_BPARAM = 6.0
ROW_STEP_RATIO = 2.0  # the runner's prior for measured / predicted step time
HOST_PIN_BYTES_PER_S = 2e9  # cudaHostAlloc of the offloaded states


def row_estimate_s(cfg: Config, pred: dict, steps: int, host_bytes: int) -> float:
    """The seconds a row should take on the GPU (see the ROW_* assumptions); 0 for a trace-only row."""
    if cfg.trace_only:
        return 0.0
    params = cfg.model.num_params()
    s = ROW_BUILD_S + ROW_S_PER_BPARAM * params / 1e9 + steps * ROW_STEP_RATIO * pred["step_time_s"]
    if cfg.offload != "none":
        s += host_bytes / HOST_PIN_BYTES_PER_S
    return round(s, 1)


def _host_bytes(cfg: Config) -> int:
    """The planner's host memory of the row's one rank (offloaded states and data)."""
    from ltune.planner.memory import estimate_memory
    from ltune.profiles import load_gpu

    gpu = load_gpu("h100-80g")
    return estimate_memory(cfg.model, gpu, cfg.layout(), cfg.seq_len, loss_chunk_tokens=cfg.loss_chunk_tokens).host_bytes_per_node


def matrix_estimate_s(configs: list[Config], gpu, steps: int) -> float:
    """The whole matrix's estimated GPU seconds (one worker process: its start counted once as a build)."""
    return round(sum(row_estimate_s(c, prediction(c, gpu), steps, _host_bytes(c)) for c in configs) + ROW_BUILD_S, 1)


def _write_jobs(runner) -> tuple[list[dict], dict[str, tuple[Config, dict]]]:
    """A run folder per configuration that runs (not the trace-only ones); the worker's job list and the planner's prediction per key."""
    jobs, preds = [], {}
    for i, cfg in enumerate(runner.setup.matrix):
        preds[cfg.key] = (cfg, prediction(cfg, runner.gpu))
        if cfg.trace_only:
            continue
        run_dir = runner.run_dir_for(f"matrix-{i}")
        runner.prepare_run_dir(cfg, run_dir, runner.setup.matrix_steps)
        jobs.append({"key": cfg.key, "run_dir": str(run_dir), "steps": runner.setup.matrix_steps})
    return jobs, preds


def _read_rows(out_file: Path) -> dict[str, dict]:
    """The worker's JSON lines, by configuration key."""
    if not out_file.is_file():
        return {}
    rows = (json.loads(line) for line in out_file.read_text().splitlines())
    return {row["key"]: row for row in rows}


def _trace_activations(trace: dict | None, pred: dict) -> dict | None:
    """A trace-only row's per-rank activation terms, traced beside predicted."""
    if not trace:
        return None
    return {k: {"traced": trace["terms"].get(k, 0), "predicted": pred["terms"].get(k, 0)} for k in ACTIVATION_TERMS}


def run(runner) -> None:
    """Every configuration in one worker process, in order, under the matrix's own time limit."""
    jobs, preds = _write_jobs(runner)
    spec, out_file = runner.work / "matrix_jobs.json", runner.work / "matrix.jsonl"
    spec.write_text(json.dumps(jobs))
    timeout = min(runner.time_left() - 30, runner.args.matrix_budget_s)
    estimate = matrix_estimate_s(runner.setup.matrix, runner.gpu, runner.setup.matrix_steps)
    runner.log(f"matrix: {len(jobs)} configurations in one process, timeout {timeout:.0f} s (GPU estimate {estimate:.0f} s)")
    rc, wall = runner.run_subprocess(worker_argv("_memory_matrix", str(spec), str(out_file)), runner.job_env({}, None), timeout)
    measured = _read_rows(out_file)
    rows = []
    for key, (cfg, pred) in preds.items():
        if cfg.trace_only:
            m = {"outcome": "trace only", "why": SP_ON_ONE_GPU}
        else:
            m = measured.get(key, {"outcome": "not run" if rc == 0 else f"not run (matrix rc={rc})"})
        trace = trace_for(cfg, runner.setup.smoke)
        row = {"config": key, "label": cfg.label, "note": cfg.note, "measured": m, "predicted": pred,
               "trace": trace, "summary": summary(m, pred),
               "groups": term_groups(m, pred, _persistent_buffers_bytes(cfg)),
               "predicted_host_bytes": _host_bytes(cfg),
               "estimated_s": row_estimate_s(cfg, pred, runner.setup.matrix_steps, _host_bytes(cfg))}
        if cfg.trace_only:
            row["trace_activations"] = _trace_activations(trace, pred)
        rows.append(row)
    runner.results["checks"]["memory_matrix"] = {
        "what": "single-GPU memory matrix, trainer steps in one process, layouts first",
        "rc": rc, "wall_s": round(wall, 1), "estimated_s": estimate, "rows": rows,
        "reserved_over_allocated": reserved_over_allocated_range(rows),
    }
