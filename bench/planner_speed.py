"""How fast the planner answers.

Prints the median wall time of the whole `ltune plan --model internlm2-20b --ctx 32768`
process (goal: at most 0.5 s) beside a bare `python -c pass` run the same way (the
baseline: interpreter start-up on this machine), the layouts evaluated per second by
the search alone (goal: at least 100,000; every layout runs the default global batch, offload
included at every GPU count), and how long `--ctx max` takes to find the longest context
(goal: well under a second), at 16 GPUs and over every GPU count.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time

ARGS = ["plan", "--model", "internlm2-20b", "--ctx", "32768"]
RUNS = 9


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) for one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def median_run(cmd: list[str]) -> tuple[float, float]:
    runs = [timed(cmd) for _ in range(RUNS)]
    return statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)


def search_rate() -> tuple[int, float]:
    from ltune.planner.search import Request, search
    from ltune.profiles import load_gpu, load_model

    req = Request(model=load_model("internlm2-20b"), gpu=load_gpu("a100-80g"), seq_len=32768)
    search(req)  # warm caches
    best = None
    for _ in range(RUNS):
        start = time.perf_counter()
        result = search(req)
        dt = time.perf_counter() - start
        best = dt if best is None or dt < best else best
    return result.evaluated, best


def longest_context_seconds() -> list[tuple[str, int | None, int, float]]:
    """(what, longest context, scans, best seconds) of --ctx max for llama3.1-70b on H100."""
    from ltune.planner.search import Pins, Request, longest_context
    from ltune.profiles import load_gpu, load_model

    out = []
    for what, pins in (("--gpus 16", Pins(num_gpus=16)), ("any count", Pins())):
        req = Request(model=load_model("llama3.1-70b"), gpu=load_gpu("h100-80g"), seq_len=1024, pins=pins)
        runs = [longest_context(req) for _ in range(3)]
        out.append((what, runs[0].seq_len, runs[0].probes, min(r.seconds for r in runs)))
    return out


def main() -> None:
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    base_wall, base_cpu = median_run([sys.executable, "-c", "pass"])
    plan_wall, plan_cpu = median_run([sys.executable, "-m", "ltune", *ARGS])
    print(f"python -c pass:           wall {base_wall:.3f} s  cpu {base_cpu:.3f} s")
    print(f"ltune {' '.join(ARGS)}: wall {plan_wall:.3f} s  cpu {plan_cpu:.3f} s "
          f"(ratio to bare python: {plan_wall / base_wall:.1f}x)")
    evaluated, seconds = search_rate()
    rate = evaluated / seconds
    print(f"search: {evaluated} layouts in {seconds * 1000:.1f} ms = {rate:,.0f} layouts/s")
    for what, seq_len, probes, secs in longest_context_seconds():
        print(f"--ctx max, llama3.1-70b on h100-80g, {what}: {seq_len:,} tokens, {probes} scans in {secs * 1000:.1f} ms")
    print(f"plan_wall_s={plan_wall:.3f} goal<=0.5 layouts_per_s={rate:.0f} goal>=100000")


if __name__ == "__main__":
    main()
