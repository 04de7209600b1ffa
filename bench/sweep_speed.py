"""How fast `ltune sweep` answers at its defaults: 9 contexts (4k to 1M) x 4 GPU types.

Prints, per model, the median seconds of the sweep computation alone (ltune.planner.sweep, 3
runs) and of the whole `ltune sweep --model M` process (3 runs, interpreter start-up
included), each with its ratio to the 5 s goal, the slowest cell, and the layouts judged.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from ltune.planner.sweep import DEFAULT_CONTEXTS, DEFAULT_SWEEP_GPUS, sweep, sweep_requests

GOAL_S = 5.0
MODELS = ("llama3.1-8b", "qwen2.5-32b", "llama3.1-70b")
RUNS = 3


def sweep_seconds(model: str):
    """(median seconds, the last result) of the in-process sweep."""
    times, result = [], None
    for _ in range(RUNS):
        start = time.perf_counter()
        result = sweep(model, sweep_requests({"model": model}, DEFAULT_SWEEP_GPUS, DEFAULT_CONTEXTS))
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def process_seconds(model: str) -> float:
    """Median wall seconds of `ltune sweep --model M` as a separate process (output discarded)."""
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ltune", "sweep", "--model", model], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    cells = len(DEFAULT_CONTEXTS) * len(DEFAULT_SWEEP_GPUS)
    print(f"ltune sweep at its defaults: {len(DEFAULT_CONTEXTS)} contexts x {len(DEFAULT_SWEEP_GPUS)} GPU types "
          f"= {cells} searches; goal {GOAL_S:.0f} s")
    for model in MODELS:
        seconds, result = sweep_seconds(model)
        whole = process_seconds(model)
        slowest = max(result.cells, key=lambda c: c.seconds)
        layouts = sum(c.evaluated for c in result.cells)
        print(f"{model:14s} sweep {seconds:5.2f} s ({seconds / GOAL_S:.2f} of goal), process {whole:5.2f} s "
              f"({whole / GOAL_S:.2f} of goal); slowest cell {slowest.gpu} at {slowest.seq_len:,} tokens "
              f"{slowest.seconds * 1000:.0f} ms; {layouts:,} layouts")


if __name__ == "__main__":
    main()
