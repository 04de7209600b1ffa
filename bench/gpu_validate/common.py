"""Constants and small helpers shared by the checks; no torch, no CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = REPO / "examples" / "tiny-cpu" / "tokenizer"
TRACE_FILE = REPO / "bench" / "gpu_validate_trace.json"
MIB = 2**20
EXIT_OOM = 3  # a worker's exit code when CUDA (or --cpu-smoke's fake cap) ran out of memory
RESULT_FILE = "gv_result.json"  # what a worker writes into each run folder it tried
RESERVE_TERMS = ("cuda_context", "comm_buffers", "fragmentation")  # planner terms outside the allocator's tensors


def worker_argv(*args: str) -> list[str]:
    """The command line of a worker subprocess: this package's entry point with a worker name."""
    return [sys.executable, "-m", "bench.gpu_validate", *args]


def write_result(run_dir: Path, result: dict) -> None:
    """A worker's outcome for one run folder (RESULT_FILE)."""
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=1))


def read_result(run_dir: Path) -> dict | None:
    """The worker's RESULT_FILE of a run folder, None when the worker never got there."""
    path = run_dir / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def outcome_of_exit(rc: int) -> str:
    """A worker's exit code as an outcome: ok, oom (EXIT_OOM), timeout (killed: -9) or error."""
    if rc == 0:
        return "ok"
    if rc == EXIT_OOM:
        return "oom"
    return "timeout" if rc == -9 else f"error rc={rc}"


def git_commit() -> str:
    """HEAD of the repository, "unknown" without git (the device copy has no .git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def nvidia_smi(query: str) -> list[str] | None:
    """nvidia-smi's csv rows for ``--query-<query>``; None where it is absent or fails."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else None


def median(values: list[float]) -> float:
    """The upper median (the middle item of the sorted values, as the results always used)."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def summarise_metrics(records: list[dict]) -> dict:
    """Peaks over all steps; step time and tokens/s as the median of the steps after the first."""
    if not records:
        return {}
    timed = records[1:] if len(records) > 1 else records
    out = {"steps": len(records), "step_time_s": median([r["step_time_s"] for r in timed]),
           "tokens_per_s_per_gpu": median([r["tokens_per_s_per_gpu"] for r in timed]),
           "losses": [round(r["loss"], 4) for r in records]}
    for key in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_rss_bytes", "device_used_bytes"):
        vals = [r[key] for r in records if key in r]
        if vals:
            out[key] = max(vals)
    for key in ("predicted_peak_bytes", "predicted_tokens_per_s_per_gpu", "mfu"):
        if key in records[-1]:
            out[key] = records[-1][key]
    return out
