"""From one traced rank to the per-GPU memory of the layout: ZeRO and sequence-parallel arithmetic.

What was traced is one rank's micro-batch (seq_len / sp_degree tokens per sequence), so the
activation bytes are per rank already: Ulysses only adds its all-to-all buffers (transient, the
size of one q/k/v/out tensor, inside the attention of one layer; not traced, see `untraced`).
The model states are traced whole (every parameter, its gradient, fp32 master copy and
two fp32 moments); how much of them each rank holds is DeepSpeed's partitioning over all
N = dp x sp ranks (DeepSpeed-Ulysses partitions ZeRO over the sequence-data-parallel group):
the planner's rule (ltune/planner/zero.py) applied per parameter tensor from the traced shapes
(`ParamPartition.of_tensors`: ceil(n / N) elements per tensor under ZeRO-3, tensors of at most
`stage3_param_persistence_threshold` elements whole; ceil(P / N) for ZeRO 1-2's flat group).
Under LoRA/QLoRA every model-dtype parameter is passed with whether it trains: gradients and
optimizer states are of the trainable ones only, the frozen weights are held like any weight, and
QLoRA's packed 4-bit weights (`RawTrace.quantized_bytes`) whole on every rank.

Phases: the step's timeline is read as forward (layers), loss (final norm, output layer, loss,
forward and backward), backward (layers), step (optimizer); the per-rank total is the model
states live in that phase plus the traced activation bytes at that instant; the peak is the
largest instant, not a sum of per-phase maxima.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ..planner.schema import Layout
from ..planner.zero import ParamPartition, model_state_bytes
from .types import CATEGORIES, ORIGINS, RawTrace

#: terms the trace cannot see (not tensors of the training step, or DeepSpeed's own buffers)
UNTRACED_TERMS = ("zero_buffers", "cuda_context", "comm_buffers", "fragmentation")

#: how the trace differs from a CUDA run by construction, and what was done about it
CORRECTIONS = (
    "attention: the trainer's CPU kernel (sdpa per document) is replaced under the trace by a stand-in "
    "that allocates and saves exactly what flash-attn 2 varlen does (q, k, v, out, fp32 logsumexp; "
    "backward dq, dk, dv, fp32 dq_accum and softmax_d, GQA dk/dv expansion)",
    "allocator: storages rounded up to 512 B as CUDA's caching allocator does; its 2 MiB/20 MiB "
    "segments and fragmentation are not traced (analytic 'fragmentation')",
    "not tensors of the step: CUDA context, cuBLAS workspace, NCCL buffers (analytic 'cuda_context', "
    "'comm_buffers'); DeepSpeed's buckets and gathered ZeRO-3 parameters (analytic 'zero_buffers'); "
    "Ulysses all-to-all buffers",
    "model states: traced whole (exact bytes per tensor), partitioned arithmetically as DeepSpeed does",
)


class TraceResult(BaseModel):
    """The traced per-GPU peak of one layout, by term (bytes), and how it was obtained."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    seq_len: int
    layout: Layout
    precision: str
    tokens_per_rank: int
    num_docs: int
    num_params: int
    peak_bytes: int
    peak_phase: str
    terms: dict[str, int]
    phase_peak_bytes: dict[str, int]
    phase_terms: dict[str, dict[str, int]]  # the terms at each phase's own peak
    unsharded_peak_bytes: int
    unsharded_peak_by_category: dict[str, int]
    untraced_terms: tuple[str, ...] = UNTRACED_TERMS
    corrections: tuple[str, ...] = CORRECTIONS
    trace_s: float
    max_rss_bytes: int


def _phase_of(pass_phase: str, region: str) -> str:
    if pass_phase == "optimizer":
        return "step"
    if region in ("head", "norm"):
        return "loss"
    return "backward" if pass_phase == "backward" else "forward"


def activation_terms(origins: tuple[int, ...], region: str) -> dict[str, int]:
    """Split live activation/temp bytes into the analytic terms, by where they were made."""
    by = dict(zip(ORIGINS, origins))
    in_layers = region in ("layer", "embed")
    checkpoints = by["forward:embed"] + by["forward:layer"] + by["forward:norm"]
    layer = sum(by[f"recompute:{r}"] for r in ("embed", "layer", "norm", "head"))
    layer += by["backward:layer"] + by["backward:embed"]
    loss = by["forward:head"] + by["backward:head"]
    if in_layers:
        layer += by["backward:norm"]  # the gradient flowing into the last layer
    else:
        loss += by["backward:norm"]
    inputs = sum(by[f"input:{r}"] for r in ("embed", "layer", "norm", "head"))
    return {
        "activations_checkpoints": checkpoints,
        "activations_layer": layer,
        "logits_loss": loss,
        "inputs": inputs,
    }


def shard(raw: RawTrace, model_name: str, seq_len: int, layout: Layout, precision: str) -> TraceResult:
    """The per-rank peak of `layout` from one traced step."""
    tl = raw.timeline
    buffer_idx = CATEGORIES.index("Buffer")
    partition = ParamPartition.of_tensors(
        raw.param_numels, layout.num_gpus, trainable=raw.param_trainable, quantized_bytes=raw.quantized_bytes
    )
    states_by_phase = {
        ph: model_state_bytes(partition, raw.dtype_bytes, layout, precision, ph)
        for ph in ("forward", "loss", "backward", "step")
    }
    best_total, best_terms, best_phase = -1, {}, "forward"
    phase_peaks: dict[str, int] = {}
    phase_terms: dict[str, dict[str, int]] = {}
    for pass_phase, region, values, origins in zip(tl.phases, tl.regions, tl.values, tl.origins):
        phase = _phase_of(pass_phase, region)
        terms = dict(states_by_phase[phase])
        terms.update(activation_terms(origins, region))
        terms["buffers"] = values[buffer_idx]
        total = sum(terms.values())
        if total > phase_peaks.get(phase, -1):
            phase_peaks[phase] = total
            phase_terms[phase] = terms
        if total > best_total:
            best_total, best_terms, best_phase = total, terms, phase
    totals = [sum(v) for v in tl.values]
    raw_idx = max(range(len(totals)), key=totals.__getitem__)
    return TraceResult(
        model=model_name,
        seq_len=seq_len,
        layout=layout,
        precision=precision,
        tokens_per_rank=raw.tokens_per_rank,
        num_docs=raw.num_docs,
        num_params=raw.num_params,
        peak_bytes=best_total,
        peak_phase=best_phase,
        terms=best_terms,
        phase_peak_bytes=phase_peaks,
        phase_terms=phase_terms,
        unsharded_peak_bytes=totals[raw_idx],
        unsharded_peak_by_category=dict(zip(CATEGORIES, tl.values[raw_idx])),
        trace_s=raw.trace_s,
        max_rss_bytes=raw.max_rss_bytes,
    )
