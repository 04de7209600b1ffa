"""The step-time model against published throughput (ltune/planner/calibration_data.py).

For each run the fit uses, prints the predicted tokens/s/GPU beside the measured one and
their ratio, and the kernel efficiency that would match the run exactly; the model's
KERNEL_EFFICIENCY is the geometric mean of those (one constant for every GPU). Then the
same for the runs held out of the fit, which the fit never saw.
"""

from __future__ import annotations

import math

from ltune.planner import throughput as T
from ltune.planner.calibration_data import FITTED_RUNS, HELD_OUT_RUNS, PublishedRun
from ltune.planner.shape import Shape
from ltune.profiles import load_gpu, load_model


def predicted(run: PublishedRun) -> float:
    """The model's tokens/s/GPU for one published run."""
    s = Shape.of(load_model(run.model), run.seq_len)
    return T.estimate_throughput(s, run.layout, load_gpu(run.gpu), run.grad_accum).tokens_per_s_per_gpu


def report(runs) -> list[float]:
    """Print each run's prediction; return the efficiencies that would match each exactly."""
    exact = []
    for run in runs:
        pred, measured = predicted(run), run.tokens_per_s_per_gpu
        exact.append(T.KERNEL_EFFICIENCY * measured / pred)
        print(f"{run.label:45s} {pred:10,.0f} {measured:9,.0f} {pred / measured:6.2f} {exact[-1]:13.3f}")
    return exact


def main() -> None:
    header = f"{'run':45s} {'predicted':>10s} {'measured':>9s} {'ratio':>6s} {'eff. to match':>13s}"
    print(f"fitted\n{header}")
    fitted = report(FITTED_RUNS)
    geo = math.exp(sum(math.log(x) for x in fitted) / len(fitted))
    print(f"KERNEL_EFFICIENCY={T.KERNEL_EFFICIENCY} geometric_mean_fit={geo:.3f}")
    print(f"\nheld out of the fit\n{header}")
    report(HELD_OUT_RUNS)


if __name__ == "__main__":
    main()
