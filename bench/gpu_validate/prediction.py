"""The planner's side of every check (pure: no torch): GPU profile, predicted memory and speed."""

from __future__ import annotations

from ltune.planner.memory import estimate_memory
from ltune.planner.shape import Shape
from ltune.planner.schema import Layout, Plan
from ltune.planner.throughput import estimate_throughput
from ltune.profiles import GIB, load_gpu
from ltune.profiles.schema import GpuProfile, ModelProfile

from bench.gpu_validate.common import RESERVE_TERMS
from bench.gpu_validate.configs import Config


def profile_name_for(device_name: str) -> str:
    """The ltune GPU profile name of a CUDA device name (h100-80g when none matches)."""
    name = device_name.upper()
    if "H200" in name:
        return "h200"
    if "H100" in name:
        return "h100-pcie" if "PCIE" in name else "h100-80g"
    if "A100" in name and "80" in name:
        return "a100-80g"
    return "h100-80g"


def gpu_profile_for(device_name: str | None, total_bytes: int | None, smoke: bool) -> tuple[GpuProfile, str]:
    """The ltune GPU profile of the device (by its CUDA name), and a note on the match."""
    if smoke or not device_name:
        return load_gpu("cpu"), "cpu smoke"
    profile = profile_name_for(device_name)
    gpu = load_gpu(profile)
    note = f"{device_name} -> profile {profile}"
    if total_bytes and abs(total_bytes - gpu.hbm_bytes) > 0.01 * gpu.hbm_bytes:
        note += f" (CUDA total {total_bytes / GIB:.2f} GiB vs profile {gpu.hbm_bytes / GIB:.2f} GiB)"
    return gpu, note


def prediction(cfg: Config, gpu: GpuProfile, safety_margin: float | None = None) -> dict:
    """The planner's analytic breakdown of one configuration, keyed for comparison.

    allocated: the terms that are tensors (all but RESERVE_TERMS), beside max_memory_allocated;
    reserved: allocated + fragmentation, beside max_memory_reserved; total_bytes: everything,
    beside the device's used memory.
    """
    kwargs = {} if safety_margin is None else {"safety_margin": safety_margin}
    mem = estimate_memory(cfg.model, gpu, cfg.layout(), cfg.seq_len, loss_chunk_tokens=cfg.loss_chunk_tokens, **kwargs)
    tensors = sum(v for k, v in mem.terms.items() if k not in RESERVE_TERMS)
    tp = estimate_throughput(Shape.of(cfg.model, cfg.seq_len, "bf16", cfg.loss_chunk_tokens), cfg.layout(), gpu)
    return {
        "terms": dict(mem.terms),
        "peak_phase": mem.peak_phase,
        "allocated_bytes": tensors,
        "reserved_bytes": tensors + mem.terms.get("fragmentation", 0),
        "total_bytes": mem.total_bytes,
        "usable_bytes": mem.usable_bytes,
        "fits": mem.fits_gpu,
        "step_time_s": tp.step_time_s,
        "tokens_per_s_per_gpu": tp.tokens_per_s_per_gpu,
        "mfu": tp.mfu,
    }


def predicted_longest(model: ModelProfile, gpu: GpuProfile, layout: Layout, *, safety_margin: float,
                      granularity: int = 1024, upper: int = 1 << 24, loss_chunk_tokens: int = 4096) -> int:
    """The longest seq_len (a multiple of granularity) the planner says fits, by bisection; 0 when none does."""

    def fits(n: int) -> bool:
        return estimate_memory(model, gpu, layout, n, loss_chunk_tokens=loss_chunk_tokens,
                               safety_margin=safety_margin).fits_gpu

    if fits(upper):
        return upper
    lo, hi = 0, upper // granularity + 1  # fits(lo * g) assumed (0 tokens), fits(hi * g) false
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid * granularity):
            lo = mid
        else:
            hi = mid
    return lo * granularity


def check_fit_summary(plan: Plan) -> dict:
    """``ltune.planner.fit.check_fit`` of a plan, the figures the results keep."""
    from ltune.planner.fit import check_fit

    ev = check_fit(plan)
    return {"fits": ev.fits, "total_bytes": ev.memory.total_bytes, "peak_phase": ev.memory.peak_phase,
            "terms": dict(ev.memory.terms), "tokens_per_s_per_gpu": ev.throughput.tokens_per_s_per_gpu,
            "step_time_s": ev.throughput.step_time_s, "mfu": ev.throughput.mfu}
