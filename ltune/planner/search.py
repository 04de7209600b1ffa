"""The search over layouts: every candidate judged at one fixed global batch, the best
layout of every GPU count found (offload included), one recommended by --prefer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import product
from typing import Iterable, Literal, NamedTuple

from pydantic import Field, model_validator

from ..profiles import GIB
from ..profiles.schema import GpuProfile, ModelProfile
from .memory import (
    PHASES,
    SAFETY_MARGIN,
    activation_terms,
    comm_buffers_bytes,
    estimate_memory,
    fragmentation_bytes,
    host_bytes_per_node,
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
    Method,
    Offload,
    Precision,
    Recompute,
    ZeroStage,
    _Frozen,
    check_method,
    check_sp_degree,
)
from .throughput import estimate_throughput

DEFAULT_GPU_COUNTS = tuple(2**i for i in range(11))  # 1 .. 1024
MICRO_BATCHES = (1, 2, 4, 8)
#: ZeRO stage and offload pairs DeepSpeed supports
ZERO_OFFLOAD = ((0, "none"), (1, "none"), (1, "optimizer"), (2, "none"), (2, "optimizer"),
                (3, "none"), (3, "optimizer"), (3, "all"))
#: tokens per optimizer step unless --global-batch or --tokens-per-step says otherwise: 4Mi.
#: Llama 2 trained with 4M-token batches (Touvron et al. 2023, arXiv:2307.09288) and its
#: long-context continual pretraining kept that many tokens per batch at 32k-token sequences
#: (Xiong et al. 2023, "Effective Long-Context Scaling of Foundation Models", arXiv:2309.16039);
#: ProLong's 64k and 512k stages use 4M-token batches too (Gao et al. 2024, arXiv:2410.02660).
DEFAULT_TOKENS_PER_STEP = 2**22
#: sequences per optimizer step at most (micro-batch x accumulation x data-parallel degree)
MAX_GLOBAL_BATCH = 2**32
#: `--ctx max` answers in multiples of this many tokens
CTX_GRANULARITY = 1024
Prefer = Literal["fewest", "fastest", "cheapest"]
PREFER_HELP = {
    "fewest": "the fewest GPUs that fit, the fastest layout there",
    "fastest": "the shortest optimizer step (most tokens/s over all GPUs)",
    "cheapest": "the fewest GPU-hours per million tokens (most tokens/s per GPU)",
}


def global_batch_for(seq_len: int, tokens_per_step: int) -> int:
    """Sequences per step for a token budget: ceil(tokens / seq_len), rounded up to a power of
    two so that it splits over power-of-two data-parallel degrees (at least 1)."""
    sequences = max(1, -(-tokens_per_step // seq_len))
    return 1 << (sequences - 1).bit_length()


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

    @property
    def dp_degree(self) -> int:
        return self.num_gpus // self.sp_degree


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
    """What the search is asked: the model at one context length on one GPU type, the global
    batch, what to prefer, and the pins."""

    model: ModelProfile
    gpu: GpuProfile
    seq_len: int = Field(gt=0, le=MAX_SEQ_LEN)
    precision: Precision = "bf16"
    loss_chunk_tokens: int = Field(default=4096, gt=0, le=MAX_SEQ_LEN)
    safety_margin: float = Field(default=SAFETY_MARGIN, ge=0, le=0.5)
    host_mem_bytes_per_node: int | None = Field(default=None, ge=0, description="None: the GPU profile's")
    global_batch: int | None = Field(default=None, gt=0, le=MAX_GLOBAL_BATCH, description="sequences per optimizer step")
    tokens_per_step: int | None = Field(
        default=None, gt=0, le=MAX_GLOBAL_BATCH * MAX_SEQ_LEN,
        description="tokens per optimizer step (global_batch unset); DEFAULT_TOKENS_PER_STEP if both unset",
    )
    prefer: Prefer = "fewest"
    doc_tokens: int | None = Field(
        default=None, gt=0, le=MAX_SEQ_LEN, description="mean packed document length (varlen attention); None: the sequence"
    )
    pins: Pins = Pins()
    method: Method = Method()

    @model_validator(mode="after")
    def _one_batch(self) -> "Request":
        if self.global_batch is not None and self.tokens_per_step is not None:
            raise ValueError("give a global batch or tokens per step, not both")
        check_method(self.method, self.model, self.pins.zero_stage)
        return self

    @property
    def host_capacity_bytes_per_node(self) -> int:
        """Host memory per node: --host-mem-gib, else the GPU profile's default."""
        if self.host_mem_bytes_per_node is None:
            return self.gpu.host_mem_bytes_per_node
        return self.host_mem_bytes_per_node

    @property
    def sequences_per_step(self) -> int:
        """The global batch every candidate runs: --global-batch, else the token budget in sequences."""
        if self.global_batch is not None:
            return self.global_batch
        return global_batch_for(self.seq_len, self.tokens_per_step or DEFAULT_TOKENS_PER_STEP)


class Shortfall(_Frozen):
    """The closest a GPU count came to fitting."""

    num_gpus: int
    layout: Layout
    over_bytes: int
    largest_term: str
    largest_term_bytes: int
    host_over_bytes: int = 0
    gradient_accumulation_steps: int = 1


# The search's answers are frozen dataclasses (built once per search, never parsed): pydantic
# models would add to every `ltune` start-up for nothing.


@dataclass(frozen=True, slots=True)
class Remedy:
    """One change that would bring the closest layout nearer to fitting, re-evaluated."""

    change: str  # the flags to give, and what they replace
    over_bytes_after: int  # overshoot left with the change (GPU or host); negative: headroom
    saving_bytes: int  # overshoot removed: before less after
    layout: Layout | None = None  # the layout judged with the change

    @property
    def fits(self) -> bool:
        return self.over_bytes_after <= 0

    @property
    def text(self) -> str:
        after = (f"fits with {-self.over_bytes_after / GIB:.1f} GiB to spare" if self.fits
                 else f"still over by {self.over_bytes_after / GIB:.1f} GiB")
        return f"{self.change}: saves {self.saving_bytes / GIB:.1f} GiB, {after}"

    def as_json(self) -> dict:
        return {"change": self.change, "over_bytes_after": self.over_bytes_after, "saving_bytes": self.saving_bytes,
                "fits": self.fits, "layout": self.layout.model_dump() if self.layout else None}


@dataclass(frozen=True, slots=True)
class Closest:
    """When nothing fits: the shortfall that misses by the least, judged, and what would
    make it fit."""

    shortfall: Shortfall
    evaluation: Evaluation
    remedies: list[Remedy]  # changes not already applied, the largest saving first


@dataclass(frozen=True, slots=True)
class CountResult:
    """One GPU count of the search: its fastest fitting layout, or how close it came."""

    num_gpus: int
    best: Evaluation | None  # the fastest layout that fits at this count
    shortfall: Shortfall | None  # when none fits: the smallest overshoot at this count
    layouts: int  # candidates judged at this count (those that reach the global batch)
    note: str | None = None  # why no layout was judged

    @property
    def fits(self) -> bool:
        return self.best is not None


@dataclass(frozen=True, slots=True)
class SearchResult:
    best: Evaluation | None
    runners_up: list[Evaluation]  # the next fitting layouts in the --prefer order
    shortfalls: list[Shortfall]  # the closest layout at each GPU count that does not fit
    closest: Closest | None  # when nothing fits: the nearest miss and its remedies
    #: the smallest fitting layout with ZeRO-3, no sequence parallel, no offload, full recompute,
    #: full loss, micro-batch 1 (XTuner's long-context recipe)
    conventional: Evaluation | None
    evaluated: int
    seconds: float
    no_offload: Evaluation | None = None  # when the pick offloads: the first fitting layout without, same order
    per_count: list[CountResult] = field(default_factory=list)  # every GPU count tried
    global_batch: int = 1  # sequences per optimizer step, the same for every candidate
    seq_len: int = 1
    prefer: str = "fewest"

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


@dataclass(frozen=True, slots=True)
class LongestContext:
    """`--ctx max`: the longest multiple of `granularity` tokens at which some layout fits."""

    seq_len: int | None  # None: not even one granularity fits
    granularity: int
    upper_seq_len: int  # the search stops here
    probes: int  # scans of the candidates run
    seconds: float

    def as_json(self) -> dict:
        return {"seq_len": self.seq_len, "granularity": self.granularity, "upper_seq_len": self.upper_seq_len,
                "probes": self.probes, "seconds": self.seconds}


@dataclass(frozen=True, slots=True)
class _NearMiss:
    """The hot loop's closest candidate at one GPU count."""

    over_bytes: int  # the larger of the GPU and the host memory overshoot
    candidate: Candidate
    grad_accum: int


@dataclass(slots=True)
class _Pass:
    """One pass of the hot loop over the candidates."""

    fitting: list[tuple[float, Candidate, int]] = field(default_factory=list)  # (tokens/s/GPU, layout, accumulation)
    near_misses: dict[int, _NearMiss] = field(default_factory=dict)  # by GPU count
    judged: dict[int, int] = field(default_factory=dict)  # candidates judged, by GPU count
    evaluated: int = 0


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


def candidates(req: Request, counts: Iterable[int] | None = None, micro_batches: Iterable[int] = MICRO_BATCHES,
               global_batch: int | None = None) -> Iterable[Candidate]:
    """Every layout the pins allow (at `counts`, default the pins' GPU counts); with
    `global_batch`, only those whose micro-batch x data-parallel degree divides it."""
    p = req.pins
    zero_offload = [
        (z, o)
        for z, o in ZERO_OFFLOAD
        if (p.zero_stage is None or z == p.zero_stage) and (p.offload is None or o == p.offload)
        and not (req.method.kind == "qlora" and z == 3)  # schema.check_method: qlora at ZeRO 0-2
    ]
    mbs = _choices(p.micro_batch_size, micro_batches)
    for n in gpu_counts(p) if counts is None else counts:
        sps = _choices(p.sp_degree, sp_degrees(req.model, n))
        for (z, o), sp, rc, loss in product(zero_offload, sps, _choices(p.recompute, ("full", "none")),
                                            _choices(p.loss, ("full", "chunked"))):
            if n % sp:
                continue
            dp = n // sp
            for mb in mbs:
                if global_batch is None or global_batch % (mb * dp) == 0:
                    yield Candidate(n, z, sp, mb, o, rc, loss, p.attention)


def grad_accum_for(global_batch: int, micro_batch_size: int, dp_degree: int) -> int | None:
    """Micro-batches per step so that micro_batch x accumulation x dp = global batch; None when
    it does not divide (the candidate is skipped) or needs more than MAX_BATCH."""
    per_micro_step = micro_batch_size * dp_degree
    if global_batch % per_micro_step:
        return None
    steps = global_batch // per_micro_step
    return steps if steps <= MAX_BATCH else None


# ---------------------------------------------------------------- judging one layout


def _shape(req: Request) -> Shape:
    # bf16 came with Ampere: without it (V100) flash-attn and torch's varlen kernel cannot run and
    # the trainer's varlen attention is SDPA per document (trainer/attention.py resolve_backend)
    return Shape.of(req.model, req.seq_len, req.precision, req.loss_chunk_tokens, doc_tokens=req.doc_tokens,
                    sdpa_math=not req.gpu.supports_bf16, method=req.method)


def _layout(c: Candidate) -> Layout:
    return Layout(**c._asdict())


def evaluate(req: Request, layout: Layout | Candidate, shape: Shape | None = None, grad_accum: int = 1) -> Evaluation:
    """Memory and time of one layout, as frozen models; the time is one optimizer step of
    `grad_accum` micro-batches."""
    s = shape or _shape(req)
    lay = layout if isinstance(layout, Layout) else _layout(layout)
    memory = estimate_memory(
        req.model, req.gpu, lay, req.seq_len, safety_margin=req.safety_margin,
        host_mem_bytes_per_node=req.host_mem_bytes_per_node, shape=s,
    )
    return Evaluation(layout=lay, memory=memory, throughput=estimate_throughput(s, lay, req.gpu, grad_accum),
                      gradient_accumulation_steps=grad_accum)


def overshoot_bytes(ev: Evaluation) -> int:
    """How far a judged layout is from fitting: the larger of its GPU and host memory overshoot
    (negative: the smaller headroom)."""
    mem = ev.memory
    return max(mem.total_bytes - mem.usable_bytes, mem.host_bytes_per_node - mem.host_capacity_bytes_per_node)


# ---------------------------------------------------------------- the hot loop


def _scan(req: Request, s: Shape, counts: Iterable[int] | None = None, first_fit: bool = False) -> _Pass:
    """The hot loop. Model states depend only on (GPUs, stage, offload), host memory only on
    (GPUs, stage, offload, micro-batch) and activations only on (sp, micro-batch, recompute,
    loss, attention): each part is computed once per key and combined per candidate. Candidates whose micro-batch x data-parallel degree does
    not divide the global batch are skipped. `first_fit` stops at the first layout that fits
    and tries micro-batch 1 only (the least memory, and the most ways to split the batch)."""
    usable = int(req.gpu.hbm_bytes * (1 - req.safety_margin))
    host_cap = req.host_capacity_bytes_per_node
    global_batch = req.sequences_per_step
    states: dict[tuple, tuple[int, ...]] = {}
    acts: dict[tuple, tuple[int, ...]] = {}
    hosts: dict[tuple, int] = {}  # host overshoot by (GPUs, stage, offload, micro-batch)
    context = req.gpu.cuda_context_bytes
    gpu = req.gpu
    out = _Pass()
    judged = out.judged
    near_misses = out.near_misses
    fitting = out.fitting
    for c in candidates(req, counts, (1,) if first_fit else MICRO_BATCHES, global_batch):
        ga = global_batch // (c.micro_batch_size * (c.num_gpus // c.sp_degree))
        if ga > MAX_BATCH:
            continue
        out.evaluated += 1
        judged[c.num_gpus] = judged.get(c.num_gpus, 0) + 1
        skey = (c.num_gpus, c.zero_stage, c.offload)
        st = states.get(skey)
        if st is None:
            st = states[skey] = tuple(sum(state_terms(s, c, ph).values()) for ph in PHASES)
        hkey = (c.num_gpus, c.zero_stage, c.offload, c.micro_batch_size)
        host_over = hosts.get(hkey)
        if host_over is None:
            host_over = hosts[hkey] = _host_over(s, c, gpu, host_cap)
        akey = (c.sp_degree, c.micro_batch_size, c.recompute, c.loss, c.attention)
        ac = acts.get(akey)
        if ac is None:
            ac = acts[akey] = tuple(sum(activation_terms(s, c, ph).values()) for ph in PHASES)
        allocated = max(a + b for a, b in zip(st, ac))
        total = allocated + fragmentation_bytes(allocated) + context + comm_buffers_bytes(gpu, c)
        over = total - usable
        if over <= 0 and host_over <= 0:
            if first_fit:
                fitting.append((0.0, c, ga))
                return out
            fitting.append((estimate_throughput(s, c, gpu, ga).tokens_per_s_per_gpu, c, ga))
        else:
            worst = over if host_over < over else host_over
            prev = near_misses.get(c.num_gpus)
            if prev is None or worst < prev.over_bytes:
                near_misses[c.num_gpus] = _NearMiss(worst, c, ga)
    return out


def _host_over(s: Shape, c: Candidate | Layout, gpu: GpuProfile, host_cap: int) -> int:
    """Host memory of the busiest node beyond its capacity, as estimate_memory counts it."""
    return host_bytes_per_node(s, c, gpu.gpus_per_node) - host_cap


# ---------------------------------------------------------------- the search


def rank_key(prefer: str, tps: float, c: Candidate | Layout) -> tuple:
    """The --prefer order, then the simplest layout (least sp, no offload, smallest micro-batch).

    fewest: fewest GPUs, then most tokens/s/GPU; fastest: most tokens/s over all GPUs (the
    shortest step for the fixed global batch), then fewest GPUs; cheapest: most tokens/s/GPU
    (GPU-hours per token = 1 / (tokens/s/GPU x 3600)), then fewest GPUs."""
    simple = (c.sp_degree, c.offload != "none", c.micro_batch_size)
    per_gpu = -round(tps, 6)
    if prefer == "fewest":
        return (c.num_gpus, per_gpu, *simple)
    if prefer == "fastest":
        return (-round(tps * c.num_gpus, 6), c.num_gpus, *simple)
    return (per_gpu, c.num_gpus, *simple)


def search(req: Request, runners_up: int = 4) -> SearchResult:
    """Judge every candidate at the request's global batch, offload included at every GPU
    count; recommend by req.prefer (default: the fastest layout at the fewest GPUs that fit)."""
    start = time.perf_counter()
    s = _shape(req)
    found = _scan(req, s)
    order = sorted(found.fitting, key=lambda f: rank_key(req.prefer, f[0], f[1]))
    judged: dict[Candidate, Evaluation] = {}

    def judge(f: tuple[float, Candidate, int]) -> Evaluation:
        ev = judged.get(f[1])
        if ev is None:
            ev = judged[f[1]] = evaluate(req, f[1], s, f[2])
        return ev

    best = judge(order[0]) if order else None
    others = [judge(f) for f in order[1 : 1 + runners_up]]
    no_offload = None
    if best is not None and best.layout.offload != "none":
        plain = next((f for f in order if f[1].offload == "none"), None)
        no_offload = judge(plain) if plain else None
    fastest_at: dict[int, tuple[float, Candidate, int]] = {}
    by_count = order if req.prefer == "fewest" else sorted(found.fitting, key=lambda f: rank_key("fewest", f[0], f[1]))
    for f in by_count:  # the first at each count is its fastest
        fastest_at.setdefault(f[1].num_gpus, f)
    per_count = []
    for n in gpu_counts(req.pins):
        layouts = found.judged.get(n, 0)
        if n in fastest_at:
            per_count.append(CountResult(num_gpus=n, best=judge(fastest_at[n]), shortfall=None, layouts=layouts))
        elif n in found.near_misses:
            miss = found.near_misses[n]
            per_count.append(CountResult(num_gpus=n, best=None, shortfall=_shortfall(s, req, miss.candidate, miss.grad_accum),
                                         layouts=layouts))
        else:
            per_count.append(CountResult(num_gpus=n, best=None, shortfall=None, layouts=0, note=batch_note(req, n)))
    shortfalls = [pc.shortfall for pc in per_count if pc.shortfall is not None]
    closest = _closest(req, min(shortfalls, key=_miss_key), s) if best is None and shortfalls else None
    return SearchResult(
        best=best,
        runners_up=others,
        no_offload=no_offload,
        per_count=per_count,
        shortfalls=shortfalls,
        closest=closest,
        conventional=_conventional(req, s),
        global_batch=req.sequences_per_step,
        seq_len=req.seq_len,
        prefer=req.prefer,
        evaluated=found.evaluated,
        seconds=time.perf_counter() - start,
    )


def batch_note(req: Request, num_gpus: int) -> str:
    """Why no layout at this GPU count reaches the global batch."""
    g = req.sequences_per_step
    sps = _choices(req.pins.sp_degree, sp_degrees(req.model, num_gpus))
    sps = [sp for sp in sps if num_gpus % sp == 0]
    if not sps:
        return f"no sequence-parallel degree divides {num_gpus} GPUs and the model's heads"
    least_dp = num_gpus // max(sps)
    if least_dp > g:
        return (f"global batch {g:,} is smaller than the data-parallel degree ({least_dp:,} at sp {max(sps)}, "
                f"the most the heads allow): give --global-batch {least_dp:,} or more")
    return (f"global batch {g:,} is not micro-batch x accumulation x data-parallel degree for any layout "
            f"(data-parallel degree {num_gpus:,}/sp, sp in {', '.join(map(str, sps))}; accumulation at most {MAX_BATCH:,})")


def _shortfall(s: Shape, req: Request, c: Candidate | Layout, grad_accum: int) -> Shortfall:
    """How far one candidate is from fitting, and its largest memory term at the peak."""
    ev = evaluate(req, c, s, grad_accum)
    _, terms = peak_terms(s, ev.layout, req.gpu)
    name = max(terms, key=terms.__getitem__)
    mem = ev.memory
    return Shortfall(
        num_gpus=ev.layout.num_gpus,
        layout=ev.layout,
        over_bytes=max(0, mem.total_bytes - mem.usable_bytes),
        largest_term=name,
        largest_term_bytes=terms[name],
        host_over_bytes=max(0, mem.host_bytes_per_node - mem.host_capacity_bytes_per_node),
        gradient_accumulation_steps=grad_accum,
    )


def _miss_key(sf: Shortfall) -> tuple:
    """Smallest overshoot (GPU or host memory) first; on a tie, more GPUs."""
    return (max(sf.over_bytes, sf.host_over_bytes), -sf.num_gpus)


def _closest(req: Request, sf: Shortfall, s: Shape) -> Closest:
    """The nearest miss when nothing fits, judged, with its remedies."""
    ev = evaluate(req, sf.layout, s, sf.gradient_accumulation_steps)
    return Closest(shortfall=sf, evaluation=ev, remedies=remedies(req, ev, s))


def conventional_zero_stage(req: Request) -> int:
    """The conventional recipe's ZeRO stage: 3, or 2 for QLoRA (schema.check_method)."""
    return 2 if req.method.kind == "qlora" else 3


def _conventional(req: Request, s: Shape) -> Evaluation | None:
    """XTuner's recipe for long context: ZeRO-3 (QLoRA: ZeRO-2, the highest it runs at), full
    recompute, full loss, micro-batch 1, at the pinned GPU count or the smallest that fits (and
    splits the global batch)."""
    for n in gpu_counts(req.pins):
        ga = grad_accum_for(req.sequences_per_step, 1, n)
        if ga is None:
            continue
        lay = Layout(num_gpus=n, zero_stage=conventional_zero_stage(req), sp_degree=1, micro_batch_size=1, offload="none",
                     recompute="full", loss="full", attention=req.pins.attention)
        ev = evaluate(req, lay, s, ga)
        if ev.fits:
            return ev
    return None


# ---------------------------------------------------------------- remedies

#: the flag of each pinned layout field
PIN_FLAGS = {"num_gpus": "--gpus", "zero_stage": "--zero-stage", "sp_degree": "--sp-degree",
             "micro_batch_size": "--micro-batch", "offload": "--offload", "recompute": "--recompute",
             "loss": "--loss"}


def _best_at(req: Request, s: Shape, counts: Iterable[int]) -> tuple[int, Candidate, int] | None:
    """(overshoot, layout, accumulation) of the layout closest to fitting at these counts (or
    the fastest fitting one, overshoot <= 0), as the search would choose it."""
    found = _scan(req, s, counts)
    if found.fitting:
        tps, c, ga = min(found.fitting, key=lambda f: rank_key("fewest", f[0], f[1]))
        return overshoot_bytes(evaluate(req, c, s, ga)), c, ga
    if not found.near_misses:
        return None
    miss = min(found.near_misses.values(), key=lambda m: (m.over_bytes, -m.candidate.num_gpus))
    return miss.over_bytes, miss.candidate, miss.grad_accum


def _changed(before: Layout, after: Candidate | Layout) -> str:
    """The layout fields a remedy changes, as flags."""
    parts = [f"{flag} {getattr(after, key)}" for key, flag in PIN_FLAGS.items()
             if key != "num_gpus" and getattr(after, key) != getattr(before, key)]
    return ", ".join(parts) or "the same layout"


def _pin_remedies(req: Request, lay: Layout, s: Shape) -> Iterable[tuple[str, int, Layout]]:
    """Unpinning each pinned layout field at the closest layout's GPU count: the search's best
    there without that pin."""
    p = req.pins
    for key, flag in PIN_FLAGS.items():
        if key == "num_gpus" or getattr(p, key) is None:
            continue
        unpinned = req.model_copy(update={"pins": p.model_copy(update={key: None})})
        got = _best_at(unpinned, s, (lay.num_gpus,))
        if got is not None:
            over, c, _ = got
            yield f"unpin {flag} {getattr(p, key)} (the search then takes {_changed(lay, c)})", over, _layout(c)


def _more_gpu_remedy(req: Request, lay: Layout, s: Shape) -> tuple[str, int, Layout] | None:
    """More GPUs than the closest layout has, where the pins or --max-gpus stopped the search:
    the doublings up to the first count that fits (or the closest of them)."""
    p = req.pins
    limit = CPU_MAX_PROCESSES if req.gpu.name == CPU_TARGET else MAX_GPUS
    if p.num_gpus is None and lay.num_gpus < p.max_gpus:
        return None  # larger counts were searched
    counts = []
    n = lay.num_gpus * 2
    while n <= limit and len(counts) < 6:
        counts.append(n)
        n *= 2
    best = None
    free = req.model_copy(update={"pins": p.model_copy(update={"num_gpus": None, "max_gpus": limit})})
    for n in counts:
        got = _best_at(free, s, (n,))
        if got is not None and (best is None or got[0] < best[0]):
            best = got
        if best is not None and best[0] <= 0:
            break
    if best is None:
        return None
    over, c, _ = best
    flag = f"--gpus {c.num_gpus}" if p.num_gpus is not None else f"--max-gpus {c.num_gpus}"
    return f"{flag} (allow {c.num_gpus} GPUs; the search then takes {_changed(lay, c)})", over, _layout(c)


def _host_remedy(req: Request, ev: Evaluation) -> tuple[str, int, Layout] | None:
    """More host memory, when the busiest node's host memory overflows: the GPU overshoot is what remains."""
    mem = ev.memory
    if mem.host_bytes_per_node <= mem.host_capacity_bytes_per_node:
        return None
    need_gib = -(-mem.host_bytes_per_node // GIB)
    return (f"--host-mem-gib {need_gib} (the nodes have {mem.host_capacity_bytes_per_node / GIB:,.0f} GiB)",
            mem.total_bytes - mem.usable_bytes, ev.layout)


def _attention_remedy(req: Request, ev: Evaluation, s: Shape) -> tuple[str, int, Layout] | None:
    if ev.layout.attention == "varlen":
        return None
    lay = ev.layout.model_copy(update={"attention": "varlen"})
    return "--attention varlen (flash attention: memory linear in the context)", overshoot_bytes(evaluate(req, lay, s)), lay


def _gpu_remedy(req: Request, ev: Evaluation) -> tuple[str, int, Layout] | None:
    """The same layout on the smallest GPU profile with more memory where it fits (else the
    largest one)."""
    from ..profiles import gpu_names, load_gpu

    lay = ev.layout
    options = []
    for name in gpu_names():
        g = load_gpu(name)
        if name == CPU_TARGET or g.hbm_bytes <= req.gpu.hbm_bytes:
            continue
        if req.precision == "bf16" and not g.supports_bf16:
            continue
        if lay.num_gpus > g.gpus_per_node and lay.num_gpus % g.gpus_per_node:
            continue
        other = req.model_copy(update={"gpu": g})
        options.append((overshoot_bytes(evaluate(other, lay)), g.hbm_bytes, g))
    fitting = [o for o in options if o[0] <= 0]
    pick = min(fitting, key=lambda o: o[1]) if fitting else min(options, key=lambda o: o[0], default=None)
    if pick is None:
        return None
    return f"--gpu {pick[2].name} ({pick[2].hbm_bytes / GIB:.0f} GiB per GPU, the same layout)", pick[0], lay


def remedies(req: Request, ev: Evaluation, s: Shape | None = None) -> list[Remedy]:
    """What would bring the closest layout to fit, each re-evaluated with the change applied:
    only changes not already applied (a pinned field unpinned, more GPUs past the pins or
    --max-gpus, more host memory, varlen attention, a GPU with more memory), the largest saving
    first; changes that save nothing are left out."""
    s = s or _shape(req)
    before = overshoot_bytes(ev)
    found = [
        *_pin_remedies(req, ev.layout, s),
        _more_gpu_remedy(req, ev.layout, s),
        _host_remedy(req, ev),
        _attention_remedy(req, ev, s),
        _gpu_remedy(req, ev),
    ]
    out = [Remedy(change=text, over_bytes_after=after, saving_bytes=before - after, layout=lay)
           for text, after, lay in filter(None, found) if after < before]
    return sorted(out, key=lambda r: -r.saving_bytes)


# ---------------------------------------------------------------- the longest context


def longest_context(req: Request, granularity: int = CTX_GRANULARITY, upper: int = MAX_SEQ_LEN) -> LongestContext:
    """The longest multiple of `granularity` tokens (up to `upper`) at which some layout the pins
    allow fits, at the request's GPU counts and batch rule.

    Memory grows with seq_len for every layout (tests check it on a grid), and a layout that
    splits the batch at a context still splits it at a shorter one (the token budget's global
    batch, a power of two, only grows as the context shrinks; unless the accumulation then
    passes MAX_BATCH), so "some layout fits" is monotone in seq_len:
    doubling from `granularity`, then bisecting, finds it in O(log(upper / granularity)) scans
    that stop at the first fitting layout."""
    start = time.perf_counter()
    if granularity <= 0:
        raise ValueError(f"granularity must be positive (got {granularity})")
    probes = 0
    counts = sorted(gpu_counts(req.pins), reverse=True)  # the most GPUs first: the likeliest to fit

    def fits(units: int) -> bool:
        nonlocal probes
        probes += 1
        at = req.model_copy(update={"seq_len": units * granularity})
        return bool(_scan(at, _shape(at), counts, first_fit=True).fitting)

    top = upper // granularity
    lo, probe = 0, 1
    while probe <= top and fits(probe):
        lo, probe = probe, probe * 2
    hi = min(probe, top + 1)  # the smallest count of units known not to fit (or past the top)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return LongestContext(seq_len=lo * granularity or None, granularity=granularity, upper_seq_len=top * granularity,
                          probes=probes, seconds=time.perf_counter() - start)
