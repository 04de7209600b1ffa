"""The step-time model against published throughput (ltune/planner/calibration_data.py).

Fit: the fitted constants of ltune/planner/throughput.py (MATMUL_EFFICIENCY, ELEMENTWISE_PASSES, ZERO3_OVERLAP;
ATTENTION_EFFICIENCY is not fitted) minimise the sum over FITTED_RUNS of log(predicted / published)^2, by coordinate
descent (golden-section search on one constant at a time, within FIT_BOUNDS, until no constant
moves by more than 1e-4) from FIT_START. throughput.py holds the fit rounded to two decimals (ELEMENTWISE_PASSES to one).

Prints, per run, the predicted and published tokens/s/GPU and the error with the constants in
throughput.py; then, for each independent source, its runs predicted by a fit that leaves that
source out (leave-one-source-out); then the runs on GPUs no profile describes (in no fit); then XTuner's runs beyond 8k, which no
fit ever sees.
Goal: every run within 25%, the leave-one-source-out median within 15%.
"""

from __future__ import annotations

import math
import statistics
from contextlib import contextmanager

from ltune.planner import throughput as T
from ltune.planner.calibration_data import FITTED_RUNS, HELD_OUT_RUNS, UNPROFILED_RUNS, PublishedRun
from ltune.planner.shape import Shape
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
    errors = {r.label: error(r) for r in (*FITTED_RUNS, *HELD_OUT_RUNS)}
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

    worst = max(errors.items(), key=lambda kv: abs(kv[1]))
    within = sum(abs(e) <= 0.25 for e in errors.values())
    print(f"\n{within}/{len(errors)} runs within 25%; worst {worst[0]} {100 * worst[1]:+.1f}%")


if __name__ == "__main__":
    main()
