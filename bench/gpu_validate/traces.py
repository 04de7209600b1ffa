"""The CPU trace (``ltune.trace``, fake tensors) of a configuration, and bench/gpu_validate_trace.json."""

from __future__ import annotations

import json
import time

from ltune.planner.memory import estimate_memory
from ltune.profiles import GIB, load_gpu

from bench.gpu_validate.common import TRACE_FILE, git_commit
from bench.gpu_validate.configs import Config, gpu_setup, trainer_config


def trace_config(cfg: Config) -> dict:
    """Trace one configuration on CPU; its peak, terms and the total comparable with the planner's."""
    from ltune.trace import comparable_totals, trace_memory

    t0 = time.perf_counter()
    res = trace_memory(cfg.model, cfg.seq_len, cfg.layout(), "bf16", loss_chunk_tokens=cfg.loss_chunk_tokens)
    analytic = estimate_memory(cfg.model, load_gpu("h100-80g"), cfg.layout(), cfg.seq_len, loss_chunk_tokens=cfg.loss_chunk_tokens)
    a_total, t_total = comparable_totals(res, analytic.terms)
    return {"peak_bytes": res.peak_bytes, "peak_phase": res.peak_phase, "terms": dict(res.terms),
            "comparable_traced_bytes": t_total, "comparable_analytic_bytes": a_total,
            "untraced_terms": list(res.untraced_terms), "trace_s": round(time.perf_counter() - t0, 1)}


def trace_for(cfg: Config, smoke: bool) -> dict | None:
    """The CPU trace of a configuration: traced now (smoke) or precomputed in TRACE_FILE (GPU mode)."""
    if smoke:
        return trace_config(cfg)
    table = json.loads(TRACE_FILE.read_text()) if TRACE_FILE.is_file() else {}
    return table.get("configs", {}).get(cfg.key)


def gpu_trace_configs() -> list[Config]:
    """Every configuration the GPU run traces: trainer_runs' and memory_matrix's."""
    setup = gpu_setup()
    return [trainer_config(setup.model, n) for n in setup.trainer_seq_lens] + setup.matrix


def write_trace_file() -> int:
    """Trace every GPU configuration here (CPU) into TRACE_FILE."""
    table = {"what": "ltune trace (CPU, fake tensors) of bench/gpu_validate's GPU configurations; "
                     "regenerate with: python -m bench.gpu_validate --write-trace",
             "commit": git_commit(), "configs": {}}
    try:
        import torch

        table["torch"] = torch.__version__
    except ImportError:
        pass
    for cfg in gpu_trace_configs():
        print(f"trace {cfg.key} ...", flush=True)
        row = table["configs"][cfg.key] = trace_config(cfg)
        print(f"  peak {row['peak_bytes'] / GIB:.2f} GiB in {row['trace_s']} s", flush=True)
    TRACE_FILE.write_text(json.dumps(table, indent=1) + "\n")
    return 0
