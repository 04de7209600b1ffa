"""`ltune check`: plan files re-judged by today's memory model, on their own GPU and on other
targets, as frozen results (no printing; ltune/render_check.py and ltune/cli.py show them).

Rules (README "Checking plans in CI"):
- a folder is searched recursively for `*.yaml` and `*.yml` (hidden files and folders skipped,
  symbolic links to folders not followed); a missing path or a folder without plans is invalid;
- the plan's own GPU is judged exactly as `ltune launch` re-checks it (`fit.check_fit`: the
  plan's stored safety margin, else SAFETY_MARGIN) unless `safety_margin` overrides the margin;
- another target keeps the layout and the job and takes that GPU profile's host memory; a GPU
  count above the target's GPUs per node must fill whole nodes (the rule `ltune plan` writes
  plans by, planner/options.py and planner/build.py), and bf16 needs a GPU with bf16;
  otherwise the target is invalid for that plan;
- drift: the plan's stored prediction (prediction.memory.total_bytes) against today's total on
  its own GPU, in % of the stored figure; more than `drift_pct` is a warning (an exit-1 failure
  with `strict_drift`);
- exit code: 2 when any input or target is invalid, else 1 when any plan does not fit (or
  drifts, with `strict_drift`), else 0.
"""

from __future__ import annotations

import os
from typing import Literal, Sequence

from pydantic import Field, computed_field

from ..profiles import load_gpu
from .fit import request_for
from .io import load_plan
from .memory import SAFETY_MARGIN
from .schema import Layout, MemoryBreakdown, Plan, _Frozen
from .search import evaluate
from .warnings import trust_remote_code_warning

Verdict = Literal["fits", "does_not_fit", "invalid"]
PLAN_SUFFIXES = (".yaml", ".yml")
MAX_REASON_CHARS = 500  # a reason quoting a huge bad value stays one readable line
DEFAULT_DRIFT_PCT = 5.0


class CheckOptions(_Frozen):
    """What `ltune check` is asked besides the paths."""

    gpus: tuple[str, ...] = Field(default=(), description="other GPU profiles each plan is checked on")
    safety_margin: float | None = Field(
        default=None, ge=0, lt=1, description="fraction of GPU memory kept free; None: the plan's own (launch's)"
    )
    drift_pct: float = Field(default=DEFAULT_DRIFT_PCT, ge=0, description="warn above this drift, % of the stored prediction")
    strict_drift: bool = Field(default=False, description="drift beyond drift_pct fails the check (exit 1)")


class TargetCheck(_Frozen):
    """One plan judged on one GPU target (target None: the plan file itself could not be used)."""

    path: str
    target: str | None = None
    own_target: bool = True
    verdict: Verdict
    error: str | None = None
    layout: Layout | None = None
    memory: MemoryBreakdown | None = None
    safety_margin: float | None = None
    stored_total_bytes: int | None = Field(default=None, description="the plan's prediction.memory.total_bytes")
    drift_pct: float | None = Field(default=None, description="100 * (today - stored) / stored")
    drifted: bool = False
    warnings: tuple[str, ...] = ()

    @computed_field
    @property
    def total_bytes(self) -> int | None:
        return self.memory.total_bytes if self.memory else None

    @computed_field
    @property
    def usable_bytes(self) -> int | None:
        return self.memory.usable_bytes if self.memory else None

    @computed_field
    @property
    def headroom_bytes(self) -> int | None:
        """Usable capacity less the predicted total (negative: short by that much)."""
        return self.memory.usable_bytes - self.memory.total_bytes if self.memory else None

    @computed_field
    @property
    def headroom_pct(self) -> float | None:
        """Headroom in % of the usable capacity."""
        if not self.memory or self.memory.usable_bytes <= 0:
            return None
        return 100 * (self.memory.usable_bytes - self.memory.total_bytes) / self.memory.usable_bytes


class CheckSummary(_Frozen):
    plans: int
    checks: int
    fits: int
    does_not_fit: int
    invalid: int
    drifted: int
    warnings: int
    exit_code: int


class CheckReport(_Frozen):
    results: tuple[TargetCheck, ...]
    options: CheckOptions

    @property
    def summary(self) -> CheckSummary:
        r = self.results
        return CheckSummary(
            plans=len({c.path for c in r}),
            checks=len(r),
            fits=sum(c.verdict == "fits" for c in r),
            does_not_fit=sum(c.verdict == "does_not_fit" for c in r),
            invalid=sum(c.verdict == "invalid" for c in r),
            drifted=sum(c.drifted for c in r),
            warnings=sum(len(c.warnings) for c in r),
            exit_code=self.exit_code,
        )

    @property
    def exit_code(self) -> int:
        """2: some input invalid; 1: some plan does not fit (or drifts, strict); 0: all fit."""
        if any(c.verdict == "invalid" for c in self.results):
            return 2
        if any(c.verdict == "does_not_fit" or (self.options.strict_drift and c.drifted) for c in self.results):
            return 1
        return 0


def _reason(e: BaseException, path: str) -> str:
    """An error as one line, without the path prefix load_plan adds, at most MAX_REASON_CHARS."""
    text = " ".join(str(e).split()) or type(e).__name__
    if text.startswith(f"{path}: "):
        text = text[len(path) + 2:]
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def find_plan_files(paths: Sequence[str]) -> list[tuple[str, str | None]]:
    """Each plan file under `paths` as (path, None), and each unusable path as (path, reason)."""
    found: list[tuple[str, str | None]] = []
    for given in paths:
        if os.path.isdir(given):
            files = []
            for root, dirs, names in os.walk(given, onerror=None, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [os.path.join(root, n) for n in sorted(names)
                          if not n.startswith(".") and n.lower().endswith(PLAN_SUFFIXES)]
            if files:
                found += [(f, None) for f in files]
            else:
                found.append((given, "no plan files (*.yaml, *.yml) in this folder or below"))
        elif os.path.exists(given):
            found.append((given, None))
        else:
            found.append((given, "no such file or folder"))
    seen: set[str] = set()
    unique = []
    for path, error in found:  # a file named twice (or inside a folder also named) is checked once
        key = os.path.realpath(path) if error is None else f"\0{path}"
        if key not in seen:
            seen.add(key)
            unique.append((path, error))
    return unique


def placement_error(num_gpus: int, gpus_per_node: int, gpu_name: str) -> str | None:
    """Why `num_gpus` cannot run on this GPU type: above one node it fills whole nodes (options.py's rule)."""
    if num_gpus > gpus_per_node and num_gpus % gpus_per_node:
        return (f"layout.num_gpus ({num_gpus}) is not a multiple of the GPUs per node ({gpus_per_node}) "
                f"of {gpu_name}")
    return None


def _on_target(plan: Plan, gpu_name: str) -> Plan:
    """The same plan (layout and job) on another GPU type, with that profile's host memory."""
    hardware = plan.hardware.model_copy(update={"gpu": gpu_name, "host_mem_gib": None, "num_nodes": 1})
    return plan.model_copy(update={"hardware": hardware})


def check_target(plan: Plan, path: str, gpu_name: str, own: bool, options: CheckOptions,
                 warnings: tuple[str, ...] = ()) -> TargetCheck:
    """One plan judged on one GPU type: check_fit's path, with the margin overridden if asked."""
    base = dict(path=path, target=gpu_name, own_target=own, layout=plan.layout, warnings=warnings)
    try:
        if not own:
            gpu = load_gpu(gpu_name)
            problem = placement_error(plan.layout.num_gpus, gpu.gpus_per_node, gpu.name)
            if problem:
                return TargetCheck(verdict="invalid", error=problem, **base)
            plan = _on_target(plan, gpu.name)
        request = request_for(plan)
        if options.safety_margin is None:  # fit.check_fit's judgement, with the plan's method
            evaluation = evaluate(request, plan.layout)
            margin = plan.prediction.safety_margin if plan.prediction else SAFETY_MARGIN
        else:
            evaluation = evaluate(request.model_copy(update={"safety_margin": options.safety_margin}), plan.layout)
            margin = options.safety_margin
    except (ValueError, ArithmeticError) as e:
        return TargetCheck(verdict="invalid", error=_reason(e, path), **base)
    mem = evaluation.memory
    stored = drift = None
    drifted = False
    if own and plan.prediction is not None:
        stored = plan.prediction.memory.total_bytes
        if stored > 0:
            drift = 100 * (mem.total_bytes - stored) / stored
            drifted = abs(drift) > options.drift_pct
        else:
            drifted = mem.total_bytes != stored
    return TargetCheck(verdict="fits" if evaluation.fits else "does_not_fit", memory=mem, safety_margin=margin,
                       stored_total_bytes=stored, drift_pct=drift, drifted=drifted, **base)


def check_plan_file(path: str, options: CheckOptions) -> list[TargetCheck]:
    """One plan file on its own GPU (which carries the plan's warnings), then on each of options.gpus."""
    try:
        plan = load_plan(path)
    except (ValueError, RecursionError) as e:  # PlanError; a non-UTF-8 or too deeply nested file
        return [TargetCheck(path=path, verdict="invalid", error=_reason(e, path))]
    warnings = tuple(w for w in (trust_remote_code_warning(plan),) if w)
    own = plan.hardware.gpu.lower()
    results = [check_target(plan, path, plan.hardware.gpu, True, options, warnings)]
    for gpu_name in options.gpus:
        if gpu_name.lower() != own:
            results.append(check_target(plan, path, gpu_name, False, options))
    return results


def check_paths(paths: Sequence[str], options: CheckOptions) -> CheckReport:
    """Every plan under `paths` checked (a bad one never stops the rest)."""
    results: list[TargetCheck] = []
    for path, error in find_plan_files(paths):
        if error is not None:
            results.append(TargetCheck(path=path, verdict="invalid", error=error))
        else:
            results += check_plan_file(path, options)
    return CheckReport(results=tuple(results), options=options)
