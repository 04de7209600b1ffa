"""`ltune sweep`: the search run over a grid of context lengths x GPU types, one frozen cell
per pair with the fewest GPUs that fit, the layout there and its cost. Computes; never prints."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

from .lora import trainable_params
from .options import LayoutOptions, layout_options, parse_tokens, request_from_options
from .schema import Evaluation, Method
from .search import Request, Shortfall, search

#: the default contexts: 4k to 1M tokens, powers of two (2**12 .. 2**20)
DEFAULT_CONTEXTS = tuple(2**k for k in range(12, 21))
#: the default GPU types: the data-centre GPUs long-context training runs on today
DEFAULT_SWEEP_GPUS = ("a100-80g", "h100-80g", "h200", "b200")


def parse_contexts(text: str) -> tuple[int, ...]:
    """--ctx of `ltune sweep`: comma-separated token counts (`8k,32k,128k`), sorted, duplicates
    dropped; a one-line ValueError otherwise."""
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"--ctx: give one or more token counts separated by commas, like 8k,32k,128k (got {text!r})")
    try:
        values = [parse_tokens(p) for p in parts]
    except ValueError as e:
        raise ValueError(f"--ctx: {e}") from None
    return tuple(sorted(set(values)))


def split_names(values: Iterable[str]) -> tuple[str, ...]:
    """Repeatable --gpu values, each possibly comma-separated, in order, duplicates dropped."""
    names: list[str] = []
    for value in values:
        for name in str(value).split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    return tuple(names)


@dataclass(frozen=True, slots=True)
class SweepCell:
    """One context length on one GPU type: the fewest GPUs that fit and the fastest layout there."""

    gpu: str  # the GPU profile's name
    seq_len: int
    best: Evaluation | None  # None: no layout fits within max_gpus
    closest: Shortfall | None  # when none fits: the smallest overshoot over the GPU counts tried
    global_batch: int  # sequences per optimizer step, as the search ran it
    evaluated: int  # layouts the search judged
    seconds: float

    @property
    def fits(self) -> bool:
        return self.best is not None

    @property
    def num_gpus(self) -> int | None:
        return self.best.layout.num_gpus if self.best is not None else None

    @property
    def tokens_per_s_per_gpu(self) -> float | None:
        return self.best.throughput.tokens_per_s_per_gpu if self.best is not None else None

    @property
    def gpu_hours_per_billion_tokens(self) -> float | None:
        """What a billion trained tokens cost: 1e9 / (tokens/s/GPU x 3600 s/h)."""
        tps = self.tokens_per_s_per_gpu
        return 1e9 / (tps * 3600) if tps else None


@dataclass(frozen=True, slots=True)
class SweepResult:
    """The grid: cells in GPU-type order, contexts ascending within each."""

    model: str
    gpus: tuple[str, ...]
    contexts: tuple[int, ...]
    max_gpus: int
    cells: tuple[SweepCell, ...]
    seconds: float
    method: Method = Method()  # what trains in every cell
    params: int = 0  # the model's parameters
    trainable_params: int = 0  # those the optimizer updates (planner/lora.py)

    def cell(self, gpu: str, seq_len: int) -> SweepCell:
        for c in self.cells:
            if c.gpu == gpu and c.seq_len == seq_len:
                return c
        raise KeyError(f"no cell for {gpu} at {seq_len} tokens")

    def series(self, gpu: str) -> list[SweepCell]:
        """The cells of one GPU type, contexts ascending."""
        return [c for c in self.cells if c.gpu == gpu]


def sweep_requests(options: dict, gpus: Iterable[str], contexts: Iterable[int]) -> list[Request]:
    """One search request per (GPU type, context), built as `ltune plan` builds its own and
    checked before anything is searched (ValueError/ProfileError, one line). `options` are
    LayoutOptions fields other than gpu and seq_len; prefer is always `fewest`."""
    given = {k: v for k, v in options.items() if v is not None and k not in ("gpu", "seq_len", "prefer")}
    requests = []
    for gpu in gpus:
        for seq_len in contexts:
            opts: LayoutOptions = layout_options(**given, gpu=gpu, seq_len=seq_len, prefer="fewest")
            requests.append(request_from_options(opts))
    return requests


def sweep_cell(req: Request) -> SweepCell:
    """The search's answer for one cell (its recommendation at --prefer fewest)."""
    result = search(req, runners_up=0)
    closest = result.closest.shortfall if result.closest is not None else None
    return SweepCell(gpu=req.gpu.name, seq_len=req.seq_len, best=result.best, closest=closest,
                     global_batch=result.global_batch, evaluated=result.evaluated, seconds=result.seconds)


def sweep(model: str, requests: list[Request], on_cell: Callable[[SweepCell], None] | None = None) -> SweepResult:
    """Search every request in turn; `on_cell` (progress) sees each cell as it is done."""
    start = time.perf_counter()
    cells = []
    for req in requests:
        cell = sweep_cell(req)
        cells.append(cell)
        if on_cell is not None:
            on_cell(cell)
    gpus = tuple(dict.fromkeys(r.gpu.name for r in requests))
    contexts = tuple(sorted({r.seq_len for r in requests}))
    max_gpus = max((r.pins.max_gpus for r in requests), default=0)
    method = requests[0].method if requests else Method()
    params = requests[0].model.num_params() if requests else 0
    trainable = trainable_params(requests[0].model, method) if requests else 0
    return SweepResult(model=model, gpus=gpus, contexts=contexts, max_gpus=max_gpus, cells=tuple(cells),
                       seconds=time.perf_counter() - start, method=method, params=params, trainable_params=trainable)
