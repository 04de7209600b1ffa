"""Entry point: ``python -m bench.gpu_validate`` (the orchestrator) or one of its worker subprocesses."""

from __future__ import annotations

import argparse
import os
import sys

import bench.gpu_validate as package


def _run_worker(name: str, args: list[str]) -> int:
    """A worker subprocess (``_cuda_context``, ``_train``, ``_memory_matrix``, ``_probe``), the only ones that touch CUDA."""
    if name == "_cuda_context":
        from bench.gpu_validate.cuda_context import measure

        return measure(args[0])
    if name == "_train":
        from bench.gpu_validate.trainer_runs import train

        return train(args[0])
    if name == "_memory_matrix":
        from bench.gpu_validate.memory_matrix import measure

        return measure(args[0], args[1])
    from bench.gpu_validate.longest_context import probe

    return probe(args[0], args[1:])


WORKERS = ("_cuda_context", "_train", "_memory_matrix", "_probe")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The orchestrator's options."""
    from bench.gpu_validate.runner import CHECKS

    ap = argparse.ArgumentParser(prog="python -m bench.gpu_validate", description=package.__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_validate_out"), help="results folder ($OUT)")
    ap.add_argument("--work", default=None, help="scratch folder (run folders, data, caches)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole run")
    ap.add_argument("--matrix-budget-s", type=float, default=200.0, help="most seconds for memory_matrix (its rows in order: the last are cut)")
    ap.add_argument("--hf-search-share", type=float, default=0.4, help="share of the time left that the HF search may use")
    ap.add_argument("--hf-search-max-s", type=float, default=130.0, help="most seconds for the HF search")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: every code path but CUDA's")
    ap.add_argument("--only", default=None, help=f"comma-separated checks among {','.join(CHECKS)}")
    ap.add_argument("--write-trace", action="store_true", help="precompute bench/gpu_validate_trace.json here (CPU)")
    args = ap.parse_args(argv)
    unknown = set(args.only.split(",")) - set(CHECKS) if args.only else set()
    if unknown:
        ap.error(f"--only: unknown check(s) {sorted(unknown)}; known: {', '.join(CHECKS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Dispatch a worker, write the trace file, or run the checks."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in WORKERS:
        return _run_worker(argv[0], argv[1:])
    args = parse_args(argv)
    if args.write_trace:
        from bench.gpu_validate.traces import write_trace_file

        return write_trace_file()
    from bench.gpu_validate.configs import gpu_setup, smoke_setup
    from bench.gpu_validate.runner import CHECKS, Runner

    setup = smoke_setup() if args.cpu_smoke else gpu_setup()
    only = set(args.only.split(",")) if args.only else set(CHECKS)
    return Runner(args, setup).run(only)


if __name__ == "__main__":
    sys.exit(main())
