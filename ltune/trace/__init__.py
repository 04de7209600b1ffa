"""`ltune trace`: the exact memory of one training step, traced on fake CPU tensors.

`trace_memory(model, seq_len, layout, precision)` builds the trainer's model on fake CPU tensors,
runs one step under PyTorch's MemTracker and returns a `TraceResult`: the per-GPU peak by analytic
term name after ZeRO/sequence-parallel partitioning. `compare(result, breakdown)` sets it beside
the analytic `MemoryBreakdown`. torch and transformers are imported only when a trace runs.
"""

from __future__ import annotations

from ..planner.schema import Layout, Method, Plan
from ..profiles.schema import ModelProfile
from .sharding import CORRECTIONS, UNTRACED_TERMS, TraceResult, shard

__all__ = ["CORRECTIONS", "UNTRACED_TERMS", "TraceResult", "compare", "comparable_totals", "trace_memory", "trace_plan_file"]


def trace_memory(
    model: ModelProfile,
    seq_len: int,
    layout: Layout,
    precision: str = "bf16",
    *,
    loss_chunk_tokens: int = 4096,
    num_docs: int | None = None,
    plan: Plan | None = None,
    on_phase=None,
    method: Method | None = None,
) -> TraceResult:
    """Trace one training step of `layout` and return the per-GPU peak by term (bytes).

    ``method``: what trains (full fine-tuning when not given; LoRA/QLoRA adapters on the frozen
    model); a ``plan`` brings its own. ``on_phase(name)``: told each phase as it starts
    (``tracer.PHASES``, in that order)."""
    from .tracer import DEFAULT_NUM_DOCS, trace_step

    tokens = seq_len // max(layout.sp_degree, 1)
    docs = num_docs if num_docs is not None else max(1, min(DEFAULT_NUM_DOCS, tokens))
    raw = trace_step(
        model, seq_len, layout, precision, num_docs=docs, loss_chunk_tokens=loss_chunk_tokens, plan=plan,
        on_phase=on_phase, method=method,
    )
    if on_phase is not None:
        on_phase("shard")
    return shard(raw, model.name, seq_len, layout, precision)


def trace_plan_file(plan: Plan, num_docs: int | None = None) -> TraceResult:
    """Trace the layout of a plan.yaml."""
    return trace_memory(
        plan.model.architecture,
        plan.training.seq_len,
        plan.layout,
        plan.training.precision,
        loss_chunk_tokens=plan.training.loss_chunk_tokens,
        num_docs=num_docs,
        plan=plan,
    )


def comparable_totals(result: TraceResult, analytic_terms: dict[str, int]) -> tuple[int, int]:
    """(analytic, traced) totals over the terms both sides count (all but UNTRACED_TERMS)."""
    analytic = sum(v for k, v in analytic_terms.items() if k not in UNTRACED_TERMS)
    traced = sum(v for k, v in result.terms.items() if k not in UNTRACED_TERMS)
    return analytic, traced


def compare(result: TraceResult, analytic_terms: dict[str, int]) -> list[dict]:
    """One row per term: analytic bytes, traced bytes (None where not traced), difference."""
    names = list(analytic_terms) + [k for k in result.terms if k not in analytic_terms]
    rows = []
    for name in names:
        analytic = analytic_terms.get(name, 0)
        traced = None if name in UNTRACED_TERMS else result.terms.get(name, 0)
        rows.append(
            {
                "term": name,
                "analytic_bytes": analytic,
                "traced_bytes": traced,
                "diff_bytes": None if traced is None else analytic - traced,
            }
        )
    return rows
