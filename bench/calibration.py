"""The step-time model against published throughput (ltune/planner/calibration_data.py).

Fit: the fitted constants of ltune/planner/throughput.py (MATMUL_EFFICIENCY, ELEMENTWISE_PASSES, ZERO3_OVERLAP;
ATTENTION_EFFICIENCY is not fitted) minimise the sum over FITTED_RUNS of log(predicted / published)^2, by coordinate
descent (golden-section search on one constant at a time, within FIT_BOUNDS, until no constant
moves by more than 1e-4) from FIT_START. throughput.py holds the fit rounded to two decimals (ELEMENTWISE_PASSES to one).

Prints, per run, the predicted and published tokens/s/GPU and the error with the constants in
throughput.py; then, for each independent source, its runs predicted by a fit that leaves that
source out (leave-one-source-out); then the runs on GPUs no profile describes (in no fit); then XTuner's runs beyond 8k
and more rows of MosaicML's table (H100, MPT-1B and 3B), which no fit ever sees; then the pairs of published rows of one source that no model of this shape can
both match (contradictions: a row doing at least another's work per micro-batch yet faster, or
slower by more than its largest work ratio).
Goal: every run within 25%, the leave-one-source-out median within 15%.
"""

from __future__ import annotations

import math
import statistics
from contextlib import contextmanager

from ltune.planner import throughput as T
from ltune.planner.calibration_data import (
    FITTED_RUNS, HELD_OUT_MOSAICML, HELD_OUT_RUNS, UNPROFILED_RUNS, PublishedRun,
)
from ltune.planner.shape import Shape, tokens_per_rank
from ltune.profiles import load_gpu

NAMES = ("MATMUL_EFFICIENCY", "ELEMENTWISE_PASSES", "ZERO3_OVERLAP")
FIT_BOUNDS = ((0.2, 1.0), (0.0, 60.0), (0.0, 1.0))
#: where every fit starts (the middle of no information, not the constants in throughput.py, so a
#: leave-one-source-out fit learns nothing from the source it leaves out)
FIT_START = (0.5, 30.0, 0.5)


@contextmanager
def constants(values: tuple[float, ...]):
    """Run the model with other values of the fitted constants, then restore them."""
    saved = tuple(getattr(T, n) for n in NAMES)
    for n, v in zip(NAMES, values):
        setattr(T, n, v)
    try:
        yield
    finally:
        for n, v in zip(NAMES, saved):
            setattr(T, n, v)


def predicted(run: PublishedRun) -> float:
    """The model's tokens/s/GPU for one published run."""
    s = Shape.of(run.profile(), run.seq_len, doc_tokens=run.doc_tokens)
    th = T.estimate_throughput(s, run.layout, load_gpu(run.gpu), run.grad_accum, run.recomputed)
    return th.tokens_per_s_per_gpu


def error(run: PublishedRun) -> float:
    """Relative error of the prediction: predicted / published - 1."""
    return predicted(run) / run.tokens_per_s_per_gpu - 1


def loss(runs, values) -> float:
    """Sum of squared log errors over the runs with these constants."""
    with constants(values):
        return sum(math.log(predicted(r) / r.tokens_per_s_per_gpu) ** 2 for r in runs)


def _golden(f, lo: float, hi: float, tol: float = 1e-5) -> float:
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


def fit(runs) -> tuple[float, ...]:
    """Least squares on the log error, by coordinate descent from FIT_START."""
    x = list(FIT_START)
    for _ in range(50):
        moved = 0.0
        for i, (lo, hi) in enumerate(FIT_BOUNDS):
            best = _golden(lambda v: loss(runs, (*x[:i], v, *x[i + 1 :])), lo, hi)
            moved = max(moved, abs(best - x[i]))
            x[i] = best
        if moved < 1e-4:
            break
    return tuple(x)


def leave_one_source_out(runs):
    """Per independent source (PublishedRun.origin): the constants fitted on the other sources' runs,
    and its own runs' errors with them, [(origin, constants, [(run, error)])]."""
    out = []
    for origin in dict.fromkeys(r.origin for r in runs):
        values = fit([r for r in runs if r.origin != origin])
        with constants(values):
            errs = [(r, error(r)) for r in runs if r.origin == origin]
        out.append((origin, values, errs))
    return out


def published_seconds_per_micro_batch(run: PublishedRun) -> float:
    """The published time of one micro-batch on one rank: its tokens over the published tokens/s/GPU."""
    return tokens_per_rank(Shape.of(run.profile(), run.seq_len), run.layout) / run.tokens_per_s_per_gpu


def _work(run: PublishedRun) -> tuple[int, int]:
    """(tokens a rank runs per micro-batch, tokens x the keys each query sees): what every linear term
    (matmuls, memory-bound work, Ulysses traffic) and the attention term of a micro-batch grow with."""
    tokens = tokens_per_rank(Shape.of(run.profile(), run.seq_len), run.layout)
    return tokens, tokens * min(run.seq_len, run.doc_tokens or run.seq_len)


def _comparable(a: PublishedRun, b: PublishedRun) -> bool:
    """Two rows of one source whose micro-batches differ only in work: the same model, GPU type and
    count, ZeRO stage and recomputed share (so the same ZeRO traffic per micro-batch)."""
    share = {r: T.recompute_share(r.layout) if r.recomputed is None else r.recomputed for r in (a, b)}
    return (a.origin == b.origin and a.profile().name == b.profile().name and a.gpu == b.gpu
            and a.layout.num_gpus == b.layout.num_gpus and a.layout.zero_stage == b.layout.zero_stage
            and share[a] == share[b] and a.label != b.label)


def contradictions(runs) -> list[tuple[PublishedRun, PublishedRun, str]]:
    """Pairs of published rows that no step-time model of this shape can both match: a micro-batch
    is a sum of terms that grow with the tokens a rank runs (matmuls, memory-bound work, all-to-alls)
    or with tokens x keys (attention), plus ZeRO traffic that is the same for two comparable rows,
    plus a cost paid once per optimizer step (spread over grad_accum micro-batches). So when row a
    does at least row b's work in every term:
    - a's micro-batch cannot be faster than b's, unless a per-step cost spread over more micro-batches
      in a makes up the gap (the smallest such cost is stated);
    - with the same sp and accumulation, a's time cannot grow by more than its largest work ratio.
    Returns (a, b, why) for each violation."""
    out = []
    for a in runs:
        for b in runs:
            if not _comparable(a, b):
                continue
            (lin_a, att_a), (lin_b, att_b) = _work(a), _work(b)
            if lin_a < lin_b or att_a < att_b or a.layout.sp_degree < b.layout.sp_degree:
                continue
            if (lin_a, att_a, a.layout.sp_degree) == (lin_b, att_b, b.layout.sp_degree):
                continue  # the same work as ltune describes it (torchtitan's two selective checkpointings)
            t_a, t_b = published_seconds_per_micro_batch(a), published_seconds_per_micro_batch(b)
            if t_a < t_b:
                why = f"does at least its work per micro-batch, yet takes {t_a:.2f} s against {t_b:.2f} s"
                if a.grad_accum > b.grad_accum:
                    step = (t_b - t_a) / (1 / b.grad_accum - 1 / a.grad_accum)
                    why += f"; only a cost of at least {step:.1f} s per optimizer step explains both"
                out.append((a, b, why))
            bound = max(lin_a / lin_b, att_a / att_b)
            if (a.layout.sp_degree == b.layout.sp_degree and a.grad_accum == b.grad_accum
                    and t_a / t_b > bound * (1 + 1e-9)):
                out.append((a, b, f"takes {t_a / t_b:.2f}x its time per micro-batch for at most {bound:.2f}x "
                                  f"its work in any term"))
    return out


def row(run: PublishedRun, err: float) -> str:
    pred = run.tokens_per_s_per_gpu * (1 + err)
    return f"  {run.label:44s} {pred:9,.0f} {run.tokens_per_s_per_gpu:9,.0f} {100 * err:+7.1f}%"


def main() -> None:
    header = f"  {'run':44s} {'predicted':>9s} {'published':>9s} {'error':>8s}"
    fitted = fit(FITTED_RUNS)
    current = tuple(getattr(T, n) for n in NAMES)
    print("constants in throughput.py: " + ", ".join(f"{n}={v}" for n, v in zip(NAMES, current)))
    print("least-squares fit (log error) on FITTED_RUNS: " + ", ".join(f"{n}={v:.3f}" for n, v in zip(NAMES, fitted)))

    print(f"\nfitted runs, constants of throughput.py\n{header}")
    errors = {r.label: error(r) for r in (*FITTED_RUNS, *HELD_OUT_RUNS, *HELD_OUT_MOSAICML)}
    for r in FITTED_RUNS:
        print(row(r, errors[r.label]))

    print("\nleave-one-source-out: each source's runs predicted by a fit on the other sources")
    loso = []
    for origin, values, errs in leave_one_source_out(FITTED_RUNS):
        print(f" without {origin}: " + ", ".join(f"{n}={v:.3f}" for n, v in zip(NAMES, values)))
        for r, e in errs:
            print(row(r, e))
        loso += [abs(e) for _, e in errs]
        print(f"  {origin} median |error| {100 * statistics.median(abs(e) for _, e in errs):.1f}%")
    print(f" leave-one-source-out median |error| over all fitted runs: {100 * statistics.median(loso):.1f}% (goal 15%)")

    print(f"\non GPUs no profile describes (in no fit), constants of throughput.py\n{header}")
    for r in UNPROFILED_RUNS:
        errors[r.label] = error(r)
        print(row(r, errors[r.label]))
    h100 = {r.layout.num_gpus: r for r in UNPROFILED_RUNS if r.gpu == "h100-80g"}
    ratio = predicted(h100[128]) / predicted(h100[8])
    published = h100[128].tokens_per_s_per_gpu / h100[8].tokens_per_s_per_gpu
    print(f"  torchtitan H100 scaling 8 -> 128 GPUs (ZeRO-3 across 16 nodes): predicted {ratio:.3f}, "
          f"published {published:.3f}")

    print(f"\nheld out of every fit (XTuner beyond 8k), constants of throughput.py\n{header}")
    for r in HELD_OUT_RUNS:
        print(row(r, errors[r.label]))
    held = [abs(errors[r.label]) for r in HELD_OUT_RUNS]
    print(f"  held-out median |error| {100 * statistics.median(held):.1f}%")

    print(f"\nheld out of every fit (MosaicML on H100, MPT-1B and 3B on A100), constants of throughput.py\n{header}")
    for r in HELD_OUT_MOSAICML:
        print(row(r, errors[r.label]))
    held = [abs(errors[r.label]) for r in HELD_OUT_MOSAICML]
    print(f"  held-out median |error| {100 * statistics.median(held):.1f}%")

    print("\npublished rows no model of this shape can both match (same source, model and GPUs)")
    for a, b, why in contradictions((*FITTED_RUNS, *UNPROFILED_RUNS, *HELD_OUT_RUNS, *HELD_OUT_MOSAICML)):
        print(f"  {a.label} against {b.label}: {why}")

    worst = max(errors.items(), key=lambda kv: abs(kv[1]))
    within = sum(abs(e) <= 0.25 for e in errors.values())
    print(f"\n{within}/{len(errors)} runs within 25%; worst {worst[0]} {100 * worst[1]:+.1f}%")


if __name__ == "__main__":
    main()
