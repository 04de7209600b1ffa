"""What one step measured, beside what the plan predicted; the metrics.jsonl writer.

FLOPs per token follow the PaLM convention (Chowdhery et al. 2022, appendix B):
6N + 12 * L * H * Q * T, with N all parameters (as the planner counts them,
ltune/planner/throughput.py), L layers, H heads of size Q, T the sequence length; no
causal halving, and recompute not counted (model FLOPs, so MFU is comparable).

The prediction logged beside the measurements is the plan's own, or, when the plan
carries none, the planner's re-check of its layout (``ltune.planner.fit.check_fit``).
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from ..planner.schema import Method, Plan
from ..profiles.schema import ModelProfile


def flops_per_token(arch: ModelProfile, seq_len: int, method: Method | None = None) -> float:
    """Model FLOPs per token exactly as the planner counts them (PaLM, for MFU; what the method
    computes: no weight gradients of frozen weights under LoRA/QLoRA)."""
    from ..planner.shape import Shape
    from ..planner.throughput import model_flops_per_token

    return model_flops_per_token(Shape.of(arch, seq_len, method=method))


def peak_flops_per_gpu(plan: Plan) -> float | None:
    """The GPU profile's dense peak for the plan's precision; None when unknown or zero."""
    try:
        from ..profiles import load_gpu

        peak = load_gpu(plan.hardware.gpu).peak_flops(plan.training.precision)
    except Exception:  # an unknown profile must not stop training
        return None
    return peak or None


def step_throughput(
    tokens_per_step: int, step_time_s: float, num_gpus: int, flops_per_token: float, peak_flops: float | None
) -> tuple[float, float | None]:
    """(tokens / step time / GPUs, MFU = that x model FLOPs per token / peak FLOP/s; PaLM, appendix B)."""
    tokens_per_s_per_gpu = tokens_per_step / step_time_s / num_gpus
    mfu = tokens_per_s_per_gpu * flops_per_token / peak_flops if peak_flops else None
    return tokens_per_s_per_gpu, mfu


def peak_memory() -> dict:
    """Measured peak memory of this process: CUDA allocator peaks, or resident memory on CPU."""
    if torch.cuda.is_available():
        return {
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
        }
    # ru_maxrss is in KiB on Linux
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def predicted(plan: Plan) -> dict:
    """The predictions for the plan, keyed like the measurements (empty when unavailable)."""
    if plan.prediction is not None:
        memory, throughput = plan.prediction.memory, plan.prediction.throughput
    else:
        try:
            from ..planner.fit import check_fit

            evaluation = check_fit(plan)
        except Exception:  # a planner that cannot judge this plan must not stop training
            return {}
        memory, throughput = evaluation.memory, evaluation.throughput
    return {
        "predicted_peak_bytes": memory.total_bytes,
        "predicted_tokens_per_s_per_gpu": throughput.tokens_per_s_per_gpu,
        "predicted_mfu": throughput.mfu,
    }


#: set by `ltune launch` in the job's environment: "tty" when its output is a terminal
PROGRESS_ENV = "LTUNE_PROGRESS"
PROGRESS_MODES = ("tty", "plain")


def progress_mode(value: str | None, isatty: bool) -> str:
    """"tty" (one live progress line) or "plain" (a log line every log_every steps): the
    launcher's LTUNE_PROGRESS when set to one of them, else whether our own stream is a terminal."""
    if value is not None and value.strip().lower() in PROGRESS_MODES:
        return value.strip().lower()
    return "tty" if isatty else "plain"


def progress_status(record: dict) -> str:
    """The live line's fields after bar, step and ETA: loss, tokens/s/GPU, peak memory beside the
    plan's ("peak measured/planned GiB"); short, as the trainer cannot read the launcher's
    terminal width (rich assumes 80 columns)."""
    parts = [f"loss {record['loss']:.4f}", f"{record['tokens_per_s_per_gpu']:.0f} tok/s/gpu"]
    for key in ("peak_allocated_bytes", "peak_rss_bytes"):
        if key in record:
            peak = f"peak {record[key] / 2**30:.2f}"
            if record.get("predicted_peak_bytes"):
                peak += f"/{record['predicted_peak_bytes'] / 2**30:.2f} GiB"
            else:
                peak += " GiB"
            parts.append(peak)
            break
    return "  ".join(parts)


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the lines of metrics.jsonl up to ``last_step`` (a resume replays the rest); the
    number of unreadable lines dropped (a line torn by a kill mid-write), written back atomically."""
    kept, torn = [], 0
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            torn += 1
            continue
        if step <= last_step:
            kept.append(line.decode() + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)
    return torn


class MetricsWriter:
    """RUN_DIR/metrics.jsonl: one JSON object per line, flushed at every write."""

    def __init__(self, path: Path, append: bool):
        self.path = Path(path)
        self._file = self.path.open("a" if append else "w")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
