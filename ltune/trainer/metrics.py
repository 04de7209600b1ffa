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


class RouterTotals:
    """A step's routing (mixture-of-experts models), summed over its micro batches on this rank,
    then over ranks in one all-reduce (``reduce``).

    Logged per step (metrics.jsonl): ``aux_loss``, the load-balancing loss averaged as the
    objective averages it (over micro batches and ranks, weighted by their target tokens:
    ``model.TrainModel``; not multiplied by router_aux_loss_coef);
    ``expert_tokens``, the target tokens routed to each expert, summed over MoE layers, micro
    batches and ranks (a token counts once per expert of its top-k); ``expert_share_min`` and
    ``expert_share_max``, per MoE layer, the smallest and largest share of that layer's
    assignments an expert got (1 / experts when balanced; 0: an expert no token chose).
    All from the routers' logits and top-k choices the forward made; one all-reduce of
    2 + layers x experts numbers per step.
    """

    def __init__(self, device):
        self.device = device
        self.aux_sum = torch.zeros((), dtype=torch.float32, device=device)  # sum of aux x target tokens
        self.expert_tokens: torch.Tensor | None = None  # (moe layers, experts)

    def add(self, stats, num_tokens) -> torch.Tensor:
        """Add one micro batch's ``model.RouterStats``; returns its LM loss sum (fp32)."""
        self.aux_sum = self.aux_sum + stats.aux_loss.float() * num_tokens
        counts = stats.expert_tokens.float()
        self.expert_tokens = counts if self.expert_tokens is None else self.expert_tokens + counts
        return stats.lm_loss_sum

    def reduce(self, loss_sum: torch.Tensor, global_tokens: int) -> tuple[float, dict]:
        """(the step's mean LM loss, the router record) from one all-reduce over all ranks."""
        import torch.distributed as dist

        counts = self.expert_tokens
        packed = torch.cat([loss_sum.reshape(1).double(), self.aux_sum.reshape(1).double(),
                            counts.reshape(-1).double()])
        if dist.is_initialized():
            dist.all_reduce(packed)
        layers, experts = counts.shape
        totals = packed[2:].reshape(layers, experts)
        shares = totals / totals.sum(dim=1, keepdim=True).clamp_min(1.0)
        record = {
            "aux_loss": float(packed[1]) / global_tokens,
            "expert_tokens": [int(round(v)) for v in totals.sum(dim=0).tolist()],
            "expert_share_min": [round(v, 4) for v in shares.min(dim=1).values.tolist()],
            "expert_share_max": [round(v, 4) for v in shares.max(dim=1).values.tolist()],
        }
        return float(packed[0]) / global_tokens, record


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
