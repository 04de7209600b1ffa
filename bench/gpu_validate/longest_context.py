"""longest_context: the longest context that trains on this GPU, ltune's trainer against transformers' defaults.

Each searched by doubling then bisecting (``search_longest``) under a time budget, catching
OutOfMemoryError, beside the planner's predicted longest context for both (safety margin 0
and 5%); ``ratio_ltune_over_hf`` (goal >= 2). ``first_oom`` null: not reached within the time
budget, so ``longest_ok`` is a lower bound.

ltune: its trainer (full recompute, chunked loss), one engine per worker process reused for
every context. "transformers' defaults", our choice: the same DeepSpeed ZeRO-3 engine,
ds_config and AdamW as ltune (so model states are identical and only activations and loss
differ), around a plain ``AutoModelForCausalLM`` with ``attn_implementation="sdpa"``, no
gradient checkpointing (the Trainer default), called as ``model(input_ids=..., labels=...)``
(transformers' ForCausalLMLoss: full logits, upcast to fp32), one unpacked sequence of
seq_len tokens, ``use_cache=False``. The planner's layout for it: recompute "none", loss
"full", attention "varlen" (sdpa's flash kernel saves what flash-attn varlen saves).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.gpu_validate.common import EXIT_OOM, read_result, summarise_metrics, worker_argv, write_result
from bench.gpu_validate.configs import Config, longest_context_config
from bench.gpu_validate.prediction import predicted_longest, prediction
from bench.gpu_validate.worker import (
    cuda_memory, error_text, fake_oom_check, oom_text, release_memory, single_rank_env, sync, trainer_with_data,
)

KINDS = ("hf", "ltune")  # hf first: ltune's search then spends whatever time is left
HF_DEFAULTS = ("DeepSpeed ZeRO-3 engine as ltune's; AutoModelForCausalLM(sdpa), no checkpointing, "
               "model(input_ids, labels) (ForCausalLMLoss, full fp32 logits), one unpacked sequence")

# ---------------------------------------------------------------- the search (pure)


def _doubling_batch(start: int, upper: int, known_ok: int, time_left, estimate_s, overhead_s) -> tuple[list[int], str | None]:
    """start, 2*start, ... up to upper, less those at or below known_ok, as many as the time left
    allows (one process: overhead_s, plus estimate_s(n) per context); why it stopped early, if it did."""
    batch, need, n = [], overhead_s(), start
    while n <= upper:
        if n > known_ok:
            need += estimate_s(n)
            if need > time_left():
                return batch, f"budget: doubling stopped before {n} (~{need:.0f} s needed, {time_left():.0f} s left)"
            batch.append(n)
        n *= 2
    return batch, None


def _bracket(tried: list[tuple[int, str]], lo: int, hi: int | None, stopped: str | None) -> tuple[int, int | None, str | None]:
    """The bracket [lo, hi) after the doubling's outcomes: longest ok, first OOM, or the error that stopped it."""
    for m, outcome in tried:
        if outcome == "ok":
            lo = max(lo, m)
        elif outcome == "oom":
            hi = m
            stopped = None  # the doubling found its limit
        else:
            stopped = f"{outcome} at {m}"
    return lo, hi, stopped


def _bisect(run_batch, lo: int, hi: int | None, stopped: str | None, probes: list[dict], *, granularity: int,
            bisections: int, time_left, estimate_s, overhead_s) -> tuple[int, int | None, str | None]:
    """Up to ``bisections`` midpoints of [lo, hi) (multiples of granularity), one process each, within the time left."""
    for _ in range(bisections):
        if hi is None:
            break
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo or mid >= hi:
            break
        need = overhead_s() + estimate_s(mid)
        if need > time_left():
            return lo, hi, f"budget: bisection at {mid} needs ~{need:.0f} s, {time_left():.0f} s left"
        tried = run_batch([mid])
        probes.extend({"seq_len": m, "outcome": o} for m, o in tried)
        outcome = tried[0][1] if tried else "not run"
        if outcome == "ok":
            lo = mid
        elif outcome == "oom":
            hi = mid
        else:
            return lo, hi, f"{outcome} at {mid}"
    return lo, hi, stopped


def search_longest(run_batch, *, start: int, granularity: int, bisections: int, known_ok: int = 0,
                   upper: int, time_left, estimate_s, overhead_s) -> dict:
    """Doubling from ``start`` until a context fails, then ``bisections`` midpoints.

    run_batch(contexts) runs ascending contexts in one process, which stops at the first that
    fails, and returns [(n, outcome)] for those it tried: outcome "ok", "oom", "timeout" or an
    error. The doubling contexts go in one batch, as many as the time left allows (overhead_s
    per process plus estimate_s(n) per context); each midpoint is a batch of its own. Contexts
    at or below ``known_ok`` (shown to train elsewhere) are not tried again.
    """
    batch, stopped = _doubling_batch(start, upper, known_ok, time_left, estimate_s, overhead_s)
    tried = run_batch(batch) if batch else []
    probes = [{"seq_len": m, "outcome": o} for m, o in tried]
    lo, hi, stopped = _bracket(tried, known_ok, None, stopped)
    lo, hi, stopped = _bisect(run_batch, lo, hi, stopped, probes, granularity=granularity, bisections=bisections,
                              time_left=time_left, estimate_s=estimate_s, overhead_s=overhead_s)
    return {"longest_ok": lo, "first_oom": hi, "probes": probes, "stopped": stopped}


# ---------------------------------------------------------------- worker: the two trainers


def _read_run_dir(run_dir: Path):
    """A run folder's plan (paths resolved) and ds_config."""
    from ltune.planner.io import load_plan
    from ltune.job.paths import resolve_plan_paths

    plan = resolve_plan_paths(load_plan(run_dir / "plan.yaml"), run_dir)
    return plan, json.loads((run_dir / "ds_config.json").read_text())


class HfDefaultsProbe:
    """transformers' defaults (see the module docstring) inside ltune's DeepSpeed engine."""

    def __init__(self, run_dir: Path):
        from ltune.trainer import engine as engine_lib

        plan, ds_config = _read_run_dir(run_dir)
        engine_lib.init_distributed()
        self.device = engine_lib.device()
        self.engine = engine_lib.initialize(plan, ds_config, self._model(plan, ds_config), 1000)

    @staticmethod
    def _model(plan, ds_config):
        """AutoModelForCausalLM (sdpa) at random init, built as ltune builds it under ZeRO-3."""
        import torch
        from transformers import AutoModelForCausalLM

        from ltune.trainer import model as model_lib

        config = model_lib.hf_config(plan, "sdpa")
        torch.manual_seed(plan.training.seed)
        if plan.layout.zero_stage == 3:
            lm = model_lib._build_zero3(plan, config, ds_config)
        else:
            lm = AutoModelForCausalLM.from_config(config)
        lm.train()
        return lm

    def _step(self, ids, step: int, seq_len: int) -> dict:
        """One forward (model(input_ids, labels)), backward and optimizer step, timed."""
        fake_oom_check(seq_len)
        sync()
        t0 = time.perf_counter()
        out = self.engine(input_ids=ids, labels=ids, use_cache=False)
        self.engine.backward(out.loss)
        self.engine.step()
        loss = float(out.loss.detach())
        del out
        sync()
        dt = time.perf_counter() - t0
        return {"step": step, "loss": loss, "step_time_s": dt, "tokens_per_s_per_gpu": ids.numel() / dt}

    def run(self, run_dir: Path) -> list[dict]:
        """The run folder's steps on one random sequence of its seq_len."""
        import torch

        plan, _ = _read_run_dir(run_dir)
        seq_len, micro = plan.training.seq_len, plan.layout.micro_batch_size
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 512, (micro, seq_len), generator=gen).to(self.device)
        return [self._step(ids, step + 1, seq_len) for step in range(plan.training.max_steps or 1)]


class LtuneProbe:
    """ltune's trainer, its engine built once and reused for every context of the batch
    (the engine -- model, optimizer, ZeRO-3 partitions -- does not depend on seq_len; each
    context gets its own Trainer: run folder, plan, data, batches, train_step)."""

    STEP_KEYS = ("step", "loss", "step_time_s", "tokens_per_s_per_gpu", "mfu")

    def __init__(self, run_dir: Path):
        self.first = trainer_with_data(run_dir, engine=True)

    def run(self, run_dir: Path) -> list[dict]:
        """The run folder's steps with the first context's engine."""
        from ltune.trainer.metrics import flops_per_token, predicted

        t = trainer_with_data(run_dir)
        for name in ("engine", "grad_divisor", "peak_flops"):
            setattr(t, name, getattr(self.first, name))
        t.flops_per_token = flops_per_token(t.plan.model.architecture, t.plan.training.seq_len)
        t.prediction = predicted(t.plan)
        records = []
        for _ in range(t.total_steps):
            fake_oom_check(t.plan.training.seq_len)
            r = t.train_step(t.next_batches())
            records.append({k: r[k] for k in self.STEP_KEYS})
        return records


def _probe_context(kind: str, probe, folder: Path) -> tuple[object, dict]:
    """One context: the allocator emptied and its peaks reset, the probe built if first, its steps; outcome recorded."""
    import torch

    t0 = time.perf_counter()
    result: dict = {}
    try:
        release_memory(reset_peaks=True)
        if probe is None:
            probe = (HfDefaultsProbe if kind == "hf" else LtuneProbe)(folder)
            result["after_init"] = cuda_memory()
        result["steps"] = probe.run(folder)
        result["outcome"] = "ok"
    except torch.OutOfMemoryError as e:
        result.update(outcome="oom", error=oom_text(e))
    except Exception as e:  # noqa: BLE001 - recorded for the search, which stops there
        import traceback

        traceback.print_exc()
        result.update(outcome="error", error=error_text(e))
    result.update(cuda_memory())
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    return probe, result


def probe(kind: str, run_dirs: list[str]) -> int:
    """Worker: ascending contexts in one process, one engine; stops at the first that fails.

    Writes RESULT_FILE into each run folder it tried: outcome, step records, peaks (reset and
    the allocator emptied before each context). Exit 0 all ok, EXIT_OOM at an OOM, 1 on
    another error.
    """
    single_rank_env()
    trainer = None
    for name in run_dirs:
        trainer, result = _probe_context(kind, trainer, Path(name))
        write_result(Path(name), result)
        print(f"probe {kind}: {name}: {result['outcome']} ({result['wall_s']:.1f} s)", flush=True)
        if result["outcome"] != "ok":
            return EXIT_OOM if result["outcome"] == "oom" else 1
    return 0


# ---------------------------------------------------------------- orchestrator (no CUDA)


def _probe_rows(runner, kind: str, cfgs: list[Config], run_dirs: list[Path], rc: int) -> list[dict]:
    """The worker's results in context order, up to the first that did not train."""
    rows = []
    for cfg, run_dir in zip(cfgs, run_dirs):
        r = read_result(run_dir)
        if r is None and rc != -9:
            break  # not reached: the process stopped before it
        r = r if r is not None else {"outcome": "timeout"}
        r.update(config=cfg.key, seq_len=cfg.seq_len, kind=kind,
                 predicted=prediction(cfg, runner.gpu, safety_margin=0.0),
                 measured=summarise_metrics(r.get("steps", [])))
        rows.append(r)
        if r["outcome"] != "ok":
            break
    return rows


def run_probe_batch(runner, kind: str, cfgs: list[Config], steps: int, timeout_s: float) -> list[dict]:
    """Worker ``_probe``: ascending contexts in one process (stops at the first failure)."""
    run_dirs = [runner.run_dir_for(f"longest-{kind}-{cfg.seq_len}") for cfg in cfgs]
    launch_envs = [runner.prepare_run_dir(cfg, run_dir, steps) for cfg, run_dir in zip(cfgs, run_dirs)]
    runner.log(f"probe {kind}: {[c.seq_len for c in cfgs]}, {steps} step(s) each, timeout {timeout_s:.0f} s")
    rc, wall = runner.run_subprocess(worker_argv("_probe", kind, *map(str, run_dirs)),
                                     runner.job_env(launch_envs[-1], runner.fake_oom_cap(kind)), timeout_s)
    rows = _probe_rows(runner, kind, cfgs, run_dirs, rc)
    if rows and all(r.get("outcome") == "ok" for r in rows):
        runner.overhead_s = max(5.0, wall - sum(r.get("wall_s", 0) for r in rows))
    runner.log(f"probe {kind}: " + ", ".join(f"{r['seq_len']}:{r['outcome']}" for r in rows) + f" in {wall:.1f} s (rc {rc})")
    return rows


def known_ok_from_trainer_runs(results: dict) -> int:
    """The longest context trainer_runs showed to train (same model, ZeRO-3, full recompute); 0 if none."""
    known = 0
    for r in results["checks"].get("trainer_runs", {}).get("runs", []):
        if r.get("outcome") == "ok":
            known = max(known, int(r["config"].split("|ctx=")[1].split("|")[0]))
    return known


def _predicted_longest_both(runner) -> dict:
    """The planner's longest context for each kind, with safety margin 0 and the default 5%."""
    out = {}
    for kind in KINDS:
        layout = longest_context_config(kind, runner.setup.model, 1024).layout()
        out[f"{kind}_predicted_longest"] = {
            "margin_0": predicted_longest(runner.setup.model, runner.gpu, layout, safety_margin=0.0),
            "margin_default": predicted_longest(runner.setup.model, runner.gpu, layout, safety_margin=0.05),
        }
    return out


def _search_kind(runner, kind: str, end: float, known_ok: int) -> dict:
    """One kind's search, its worker processes bounded by ``end`` (monotonic seconds)."""
    setup, runs = runner.setup, []

    def run_batch(contexts):
        rows = run_probe_batch(runner, kind, [longest_context_config(kind, setup.model, n) for n in contexts],
                               setup.search_steps, max(30.0, end - time.monotonic() + 30))
        runs.extend(rows)
        runner.save()
        return [(r["seq_len"], r["outcome"]) for r in rows]

    def estimate_s(n: int) -> float:
        pred = prediction(longest_context_config(kind, setup.model, n), runner.gpu)
        return setup.search_steps * pred["step_time_s"] * runner.step_time_ratio * 1.3 + 2

    result = search_longest(
        run_batch, start=setup.search_start, granularity=setup.search_granularity, bisections=setup.search_bisections,
        known_ok=known_ok, upper=setup.search_max, time_left=lambda: end - time.monotonic(), estimate_s=estimate_s,
        overhead_s=lambda: runner.overhead_s,
    )
    result["known_ok_from_trainer_runs"] = known_ok
    result["runs"] = runs
    return result


def run(runner) -> None:
    """Both searches: transformers' defaults within its share of the time, then ltune's with the rest."""
    check: dict = {"what": "longest context that trains, 1 GPU, ZeRO-3 bf16", "hf_defaults": HF_DEFAULTS,
                   "steps_per_context": runner.setup.search_steps}
    runner.results["checks"]["longest_context"] = check
    check.update(_predicted_longest_both(runner))
    known_ltune = known_ok_from_trainer_runs(runner.results)
    args = runner.args
    hf_end = time.monotonic() + min(args.hf_search_max_s, args.hf_search_share * max(0.0, runner.time_left() - 10))
    for kind in KINDS:
        end = hf_end if kind == "hf" else runner.deadline - 10
        check[kind] = _search_kind(runner, kind, end, known_ltune if kind == "ltune" else 0)
        runner.save()
    lt, hf = check["ltune"]["longest_ok"], check["hf"]["longest_ok"]
    check["ratio_ltune_over_hf"] = round(lt / hf, 2) if hf else None
