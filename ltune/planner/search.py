"""The search over layouts: every candidate judged, the fastest that fits recommended."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from itertools import product
from typing import Iterable, NamedTuple

from pydantic import Field

from ..profiles.schema import GpuProfile, ModelProfile
from .memory import (
    PHASES,
    SAFETY_MARGIN,
    activation_terms,
    comm_buffers_bytes,
    estimate_memory,
    fragmentation_bytes,
    host_offload_bytes_per_gpu,
    peak_terms,
    state_terms,
)
from .shape import Shape
from .schema import (
    CPU_MAX_PROCESSES,
    CPU_TARGET,
    MAX_BATCH,
    MAX_GPUS,
    MAX_SEQ_LEN,
    Attention,
    Evaluation,
    Layout,
    LossMode,
    Offload,
    Precision,
    Recompute,
    ZeroStage,
    _Frozen,
    check_sp_degree,
)
from .throughput import estimate_throughput, tokens_per_s_per_gpu

DEFAULT_GPU_COUNTS = tuple(2**i for i in range(11))  # 1 .. 1024
MICRO_BATCHES = (1, 2, 4, 8)
#: ZeRO stage and offload pairs DeepSpeed supports
ZERO_OFFLOAD = ((0, "none"), (1, "none"), (1, "optimizer"), (2, "none"), (2, "optimizer"),
                (3, "none"), (3, "optimizer"), (3, "all"))


class Candidate(NamedTuple):
    """A layout as the hot loop sees it (same attribute names as schema.Layout)."""

    num_gpus: int
    zero_stage: int
    sp_degree: int
    micro_batch_size: int
    offload: str
    recompute: str
    loss: str
    attention: str


class Pins(_Frozen):
    """What the user fixed on the command line; None leaves it to the search."""

    num_gpus: int | None = Field(default=None, gt=0, le=MAX_GPUS)
    zero_stage: ZeroStage | None = None
    sp_degree: int | None = Field(default=None, gt=0, le=MAX_GPUS)
    micro_batch_size: int | None = Field(default=None, gt=0, le=MAX_BATCH)
    offload: Offload | None = None
    recompute: Recompute | None = None
    loss: LossMode | None = None
    attention: Attention = "varlen"
    max_gpus: int = Field(default=1024, gt=0, le=MAX_GPUS)


class Request(_Frozen):
    """What the search is asked: the model at one context length on one GPU type, and the pins."""

    model: ModelProfile
    gpu: GpuProfile
    seq_len: int = Field(gt=0, le=MAX_SEQ_LEN)
    precision: Precision = "bf16"
    loss_chunk_tokens: int = Field(default=4096, gt=0, le=MAX_SEQ_LEN)
    safety_margin: float = Field(default=SAFETY_MARGIN, ge=0, le=0.5)
    host_mem_bytes_per_node: int | None = Field(default=None, ge=0, description="None: the GPU profile's")
    pins: Pins = Pins()

    @property
    def host_capacity_bytes_per_node(self) -> int:
        """Host memory per node: --host-mem-gib, else the GPU profile's default."""
        if self.host_mem_bytes_per_node is None:
            return self.gpu.host_mem_bytes_per_node
        return self.host_mem_bytes_per_node


class Shortfall(_Frozen):
    """The closest a GPU count came to fitting."""

    num_gpus: int
    layout: Layout
    over_bytes: int
    largest_term: str
    largest_term_bytes: int
    host_over_bytes: int = 0


class Closest(_Frozen):
    """When nothing fits: the shortfall that misses by the least, judged, and what would
    make it fit."""

    shortfall: Shortfall
    evaluation: Evaluation
    remedies: list[str]


class SearchResult(_Frozen):
    best: Evaluation | None
    runners_up: list[Evaluation]
    shortfalls: list[Shortfall] = Field(description="the closest layout at each smaller GPU count")
    closest: Closest | None = Field(description="when nothing fits: the nearest miss and its remedies")
    conventional: Evaluation | None = Field(
        description="the smallest fitting layout with ZeRO-3, no sequence parallel, no offload, "
        "full recompute, full loss, micro-batch 1 (XTuner's long-context recipe)"
    )
    evaluated: int
    seconds: float


@dataclass(frozen=True, slots=True)
class _NearMiss:
    """The hot loop's closest candidate at one GPU count."""

    over_bytes: int  # the larger of the GPU and the host memory overshoot
    candidate: Candidate


@dataclass(frozen=True, slots=True)
class _Pass:
    """One pass of the hot loop over the candidates."""

    fitting: list[Candidate]  # fastest first, by _rank_key
    near_misses: dict[int, _NearMiss]  # by GPU count
    shape: Shape
    evaluated: int


# ---------------------------------------------------------------- candidates


def sp_degrees(model: ModelProfile, num_gpus: int) -> list[int]:
    """Sequence-parallel degrees that divide the GPU count and the attention heads.

    Ulysses scatters heads over the sp group, so only divisors of the heads are tried:
    at most num_attention_heads of them, however many GPUs."""
    out = []
    for sp in range(1, min(num_gpus, model.num_attention_heads) + 1):
        if num_gpus % sp or model.num_attention_heads % sp:
            continue
        try:
            check_sp_degree(sp, model)
        except ValueError:
            continue
        out.append(sp)
    return out


def gpu_counts(pins: Pins) -> tuple[int, ...]:
    if pins.num_gpus is not None:
        return (pins.num_gpus,)
    return tuple(n for n in DEFAULT_GPU_COUNTS if n <= pins.max_gpus)


def _choices(pinned, default: Iterable) -> tuple:
    return (pinned,) if pinned is not None else tuple(default)


def candidates(req: Request) -> Iterable[Candidate]:
    """Every layout the pins allow."""
    p = req.pins
    zero_offload = [
        (z, o)
        for z, o in ZERO_OFFLOAD
        if (p.zero_stage is None or z == p.zero_stage) and (p.offload is None or o == p.offload)
    ]
    for n in gpu_counts(p):
        sps = _choices(p.sp_degree, sp_degrees(req.model, n))
        for (z, o), sp, rc, loss in product(zero_offload, sps, _choices(p.recompute, ("full", "none")),
                                            _choices(p.loss, ("full", "chunked"))):
            if n % sp:
                continue
            for mb in _choices(p.micro_batch_size, MICRO_BATCHES):
                yield Candidate(n, z, sp, mb, o, rc, loss, p.attention)


# ---------------------------------------------------------------- the search


def _layout(c: Candidate) -> Layout:
    return Layout(**c._asdict())


def evaluate(req: Request, layout: Layout | Candidate, shape: Shape | None = None) -> Evaluation:
    """Memory and time of one layout, as frozen models."""
    s = shape or Shape.of(req.model, req.seq_len, req.precision, req.loss_chunk_tokens)
    lay = layout if isinstance(layout, Layout) else _layout(layout)
    memory = estimate_memory(
        req.model, req.gpu, lay, req.seq_len, safety_margin=req.safety_margin,
        host_mem_bytes_per_node=req.host_mem_bytes_per_node, shape=s,
    )
    return Evaluation(layout=lay, memory=memory, throughput=estimate_throughput(s, lay, req.gpu))


def _rank_key(ev_tps: float, c: Candidate) -> tuple:
    """Fewest GPUs, then most tokens/s/GPU, then the simplest layout."""
    return (c.num_gpus, -round(ev_tps, 6), c.sp_degree, c.offload != "none", c.micro_batch_size)


def search(req: Request, runners_up: int = 4) -> SearchResult:
    """Judge every candidate; recommend the fastest fitting layout at the smallest GPU count.

    Offload is a last resort: unless --offload is pinned, offloading layouts are only
    searched when nothing fits without them (they trade a lot of speed for memory).
    """
    start = time.perf_counter()
    found = _search(req, allow_offload=req.pins.offload is not None)
    if not found.fitting and req.pins.offload is None:
        offloading = _search(req, allow_offload=True)
        found = replace(offloading, evaluated=found.evaluated + offloading.evaluated)
    s = found.shape
    best = evaluate(req, found.fitting[0], s) if found.fitting else None
    others = [evaluate(req, c, s) for c in found.fitting[1 : 1 + runners_up]]
    min_fit = best.layout.num_gpus if best else None
    shortfalls = [
        _shortfall(s, req, miss.candidate)
        for n, miss in sorted(found.near_misses.items())
        if min_fit is None or n < min_fit
    ]
    closest = _closest(req, min(shortfalls, key=_miss_key), s) if best is None and shortfalls else None
    return SearchResult(
        best=best,
        runners_up=others,
        shortfalls=shortfalls,
        closest=closest,
        conventional=_conventional(req, s),
        evaluated=found.evaluated,
        seconds=time.perf_counter() - start,
    )


def _search(req: Request, allow_offload: bool) -> _Pass:
    """The hot loop. Model states depend only on (GPUs, stage, offload) and activations
    only on (sp, micro-batch, recompute, loss, attention): each part is computed once per
    key and combined per candidate."""
    s = Shape.of(req.model, req.seq_len, req.precision, req.loss_chunk_tokens)
    usable = int(req.gpu.hbm_bytes * (1 - req.safety_margin))
    host_cap = req.host_capacity_bytes_per_node
    states: dict[tuple, tuple[int, ...]] = {}
    acts: dict[tuple, tuple[int, ...]] = {}
    context = req.gpu.cuda_context_bytes
    fitting: list[tuple[tuple, Candidate]] = []  # (rank key, candidate)
    near_misses: dict[int, _NearMiss] = {}
    evaluated = 0
    for c in candidates(req):
        if c.offload != "none" and not allow_offload:
            continue
        evaluated += 1
        skey = (c.num_gpus, c.zero_stage, c.offload)
        st = states.get(skey)
        if st is None:
            st = states[skey] = tuple(sum(state_terms(s, c, ph).values()) for ph in PHASES)
        akey = (c.sp_degree, c.micro_batch_size, c.recompute, c.loss, c.attention)
        ac = acts.get(akey)
        if ac is None:
            ac = acts[akey] = tuple(sum(activation_terms(s, c, ph).values()) for ph in PHASES)
        allocated = max(a + b for a, b in zip(st, ac))
        total = allocated + fragmentation_bytes(allocated) + context + comm_buffers_bytes(req.gpu, c)
        over = total - usable
        host_over = _host_over(s, c, req.gpu, host_cap) if c.offload != "none" else 0
        if over <= 0 and host_over <= 0:
            tps = tokens_per_s_per_gpu(s, c, req.gpu)
            fitting.append((_rank_key(tps, c), c))
        else:
            worst = max(over, host_over)
            prev = near_misses.get(c.num_gpus)
            if prev is None or worst < prev.over_bytes:
                near_misses[c.num_gpus] = _NearMiss(worst, c)
    fitting.sort(key=lambda kc: kc[0])
    return _Pass([c for _, c in fitting], near_misses, s, evaluated)


def _host_over(s: Shape, c: Candidate, gpu: GpuProfile, host_cap: int) -> int:
    if c.offload == "none":
        return 0
    return host_offload_bytes_per_gpu(s, c) * min(c.num_gpus, gpu.gpus_per_node) - host_cap


def _shortfall(s: Shape, req: Request, c: Candidate) -> Shortfall:
    """How far one candidate is from fitting, and its largest memory term at the peak."""
    ev = evaluate(req, c, s)
    _, terms = peak_terms(s, c, req.gpu)
    name = max(terms, key=terms.__getitem__)
    return Shortfall(
        num_gpus=c.num_gpus,
        layout=ev.layout,
        over_bytes=max(0, ev.memory.total_bytes - ev.memory.usable_bytes),
        largest_term=name,
        largest_term_bytes=terms[name],
        host_over_bytes=max(0, _host_over(s, c, req.gpu, req.host_capacity_bytes_per_node)),
    )


def _miss_key(sf: Shortfall) -> tuple:
    """Smallest overshoot (GPU or host memory) first; on a tie, more GPUs."""
    return (max(sf.over_bytes, sf.host_over_bytes), -sf.num_gpus)


def _closest(req: Request, sf: Shortfall, s: Shape) -> Closest:
    """The nearest miss when nothing fits, judged, with its remedies."""
    return Closest(shortfall=sf, evaluation=evaluate(req, sf.layout, s), remedies=remedies(req, sf))


def _conventional(req: Request, s: Shape) -> Evaluation | None:
    """XTuner's recipe for long context: ZeRO-3, full recompute, full loss, micro-batch 1,
    at the pinned GPU count or the smallest that fits."""
    for n in gpu_counts(req.pins):
        lay = Layout(num_gpus=n, zero_stage=3, sp_degree=1, micro_batch_size=1, offload="none",
                     recompute="full", loss="full", attention=req.pins.attention)
        ev = evaluate(req, lay, s)
        if ev.fits:
            return ev
    return None


def remedies(req: Request, sf: Shortfall) -> list[str]:
    """What would make the closest layout fit, most direct first."""
    p = req.pins
    out: list[str] = []
    flags = {"num_gpus": "--gpus", "zero_stage": "--zero-stage", "sp_degree": "--sp-degree",
             "micro_batch_size": "--micro-batch", "offload": "--offload", "recompute": "--recompute",
             "loss": "--loss"}
    pinned = [flag for key, flag in flags.items() if getattr(p, key) is not None]
    if pinned:
        out.append(f"unpin {', '.join(pinned)} to let the search choose")
    if sf.host_over_bytes > 0:
        out.append("give the nodes more host memory (--host-mem-gib) or offload less")
        if sf.over_bytes <= 0:
            return out + ["use a GPU with more memory (ltune gpus)"]
    at_cpu_limit = req.gpu.name == CPU_TARGET and p.max_gpus >= CPU_MAX_PROCESSES
    if p.num_gpus is None and sf.num_gpus >= p.max_gpus and p.max_gpus < MAX_GPUS and not at_cpu_limit:
        out.append(f"allow more than {p.max_gpus} GPUs (--max-gpus)")
    if sf.largest_term == "logits_loss" and p.loss != "chunked":
        out.append("use the chunked loss (--loss chunked)")
    if sf.largest_term.startswith("activations"):
        out.append("raise the sequence-parallel degree or keep full recompute")
    if sf.largest_term in ("optimizer_states", "master_weights", "weights", "gradients"):
        out.append("shard over more GPUs or offload the optimizer (--offload optimizer)")
    out.append("use a GPU with more memory (ltune gpus)")
    return out
