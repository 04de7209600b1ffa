"""Helpers of the worker subprocesses (the only processes that touch CUDA)."""

from __future__ import annotations

import os

from bench.gpu_validate.data import free_port


def single_rank_env() -> None:
    """A process group of one (rank 0 of 1) unless the environment already says otherwise."""
    import warnings

    # DeepSpeed 0.19 calls collectives that newer torch marks deprecated, once per call
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def cuda_memory() -> dict:
    """This process's CUDA allocator peaks and the device's used memory (peak RSS on CPU)."""
    import torch

    if not torch.cuda.is_available():
        import resource

        return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()
    return {
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
        "allocated_bytes": torch.cuda.memory_allocated(),
        "reserved_bytes": torch.cuda.memory_reserved(),
        "device_used_bytes": total - free,
        "device_total_bytes": total,
        "alloc_retries": stats.get("num_alloc_retries", 0),
        "num_ooms": stats.get("num_ooms", 0),
    }


def release_memory(reset_peaks: bool) -> None:
    """Collect garbage and empty the CUDA allocator's cache (and reset its peaks when asked)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        if reset_peaks:
            torch.cuda.reset_peak_memory_stats()


def fake_oom_check(seq_len: int) -> None:
    """--cpu-smoke: a context above GV_FAKE_OOM_TOKENS raises the OOM a GPU would."""
    cap = os.environ.get("GV_FAKE_OOM_TOKENS")
    if cap and seq_len > int(cap):
        import torch

        raise torch.OutOfMemoryError(f"fake OOM (--cpu-smoke): seq_len {seq_len} > {cap}")


def sync() -> None:
    """Wait for the GPU's queued work (no-op on CPU), so a step's wall time is its own."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def error_text(e: BaseException, limit: int = 400) -> str:
    """An exception as one short line for results.json."""
    return f"{type(e).__name__}: {e}"[:limit]


def oom_text(e: BaseException) -> str:
    """An OutOfMemoryError's first line (its message lists the allocator's whole state after)."""
    return (str(e).splitlines() or [""])[0][:400]


def trainer_with_data(run_dir, *, engine: bool = False):
    """The trainer of a run folder, by its own setup methods, up to its data (and its engine)."""
    from ltune.trainer.loop import Trainer

    trainer = Trainer(run_dir)
    trainer.read_run_dir()
    trainer.check_inputs()
    trainer.join_process_group()
    trainer.prepare_data()
    if engine:
        trainer.build_engine()
    return trainer
