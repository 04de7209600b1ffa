"""How fast `ltune check` judges a folder of plans.

Writes 100 varied valid plans (models, context lengths, GPU types, pinned layouts, fitting or
not on the extra --gpu target) into a temporary folder, in nested subfolders, then times
`ltune check FOLDER --gpu h100-80g` over them in-process (the command through typer's
CliRunner, every output format) and as a whole `python -m ltune check` process (interpreter
start-up and imports included). Goal: the whole command under 2 s for 100 plans; printed as
the ratio wall / goal (below 1 passes).
"""

from __future__ import annotations

import itertools
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_S = 2.0
NUM_PLANS = 100
RUNS = 5
MODELS = ("qwen2.5-0.5b", "internlm2-1.8b", "llama3.1-8b", "mistral-7b", "qwen2.5-14b", "internlm2-20b",
          "yi-34b", "llama3.1-70b")
CONTEXTS = (4096, 16384, 65536, 262144)
GPUS = ("a100-80g", "h100-80g", "h200", "mi300x", "l40s", "a100-40g")
PINS = ({}, {"zero_stage": 2}, {"loss": "chunked"}, {"offload": "optimizer"}, {"recompute": "full", "micro_batch_size": 1})


def write_plans(folder: Path, count: int = NUM_PLANS) -> int:
    """`count` plans written by the planner itself (search, then build_plan), in subfolders."""
    from ltune.planner.build import build_plan
    from ltune.planner.io import dump_plan
    from ltune.planner.search import Pins, Request, search
    from ltune.profiles import load_gpu, load_model

    combos = list(itertools.product(MODELS, CONTEXTS, GPUS, PINS))
    random.Random(0).shuffle(combos)  # varied, and the same every run
    written = 0
    for model, ctx, gpu, pins in combos:
        if written == count:
            break
        g = load_gpu(gpu)
        req = Request(model=load_model(model), gpu=g, seq_len=ctx, precision="bf16" if g.supports_bf16 else "fp16",
                      pins=Pins(**pins, max_gpus=64))
        best = search(req, runners_up=0).best
        if best is None:
            continue
        plan = build_plan(req, best, model, {"max_steps": 100, "learning_rate": 1e-5, "data": []}, None)
        sub = folder / gpu / model
        sub.mkdir(parents=True, exist_ok=True)
        dump_plan(plan, sub / f"{ctx}-{written}.yaml")
        written += 1
    return written


def in_process(folder: Path, output_format: str) -> tuple[float, int]:
    """(median seconds, exit code) of the check command run through CliRunner."""
    from typer.testing import CliRunner

    from ltune.cli import app

    runner = CliRunner()
    times, code = [], None
    for _ in range(RUNS):
        start = time.perf_counter()
        res = runner.invoke(app, ["check", str(folder), "--gpu", "h100-80g", "--format", output_format])
        times.append(time.perf_counter() - start)
        code = res.exit_code
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
    return statistics.median(times), code


def subprocess_wall(cmd: list[str]) -> float:
    """Median wall seconds of the whole process."""
    env = {**os.environ, "GITHUB_ACTIONS": "false"}
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="ltune-check-bench-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        n = write_plans(folder)
        print(f"wrote {n} plans in {time.perf_counter() - start:.1f} s")
        checks = None
        for fmt in ("text", "json", "junit", "github"):
            seconds, code = in_process(folder, fmt)
            print(f"in-process  ltune check --format {fmt:<6}: {seconds:.3f} s for {n} plans x 2 targets "
                  f"(exit {code}; {1000 * seconds / n:.1f} ms per plan)")
            checks = checks or seconds
        base = subprocess_wall([sys.executable, "-c", "pass"])
        wall = subprocess_wall([sys.executable, "-m", "ltune", "check", str(folder), "--gpu", "h100-80g"])
        print(f"python -c pass: wall {base:.3f} s")
        print(f"python -m ltune check ({n} plans, --gpu h100-80g): wall {wall:.3f} s")
        print(f"check_wall_s={wall:.3f} goal<={GOAL_S} ratio={wall / GOAL_S:.2f} "
              f"{'PASS' if wall <= GOAL_S else 'FAIL'}")


if __name__ == "__main__":
    main()
