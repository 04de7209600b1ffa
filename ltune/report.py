"""`ltune report RUN_DIR`: what a run measured (metrics.jsonl) beside what its plan predicted.

Pure: reads the run folder's metrics.jsonl and plan.yaml and returns frozen results; only
ltune/cli.py prints. Imports neither torch nor matplotlib (charts: ltune/charts.py).

The numbers, from the trainer's records (ltune/trainer/loop.py ``train_step``/``log_step``):
- tokens per step = micro_batch_size x gradient_accumulation_steps x (num_gpus / sp_degree) x
  seq_len (padding included, as the trainer counts its throughput);
- tokens/s/GPU over the steady steps (all but the run's first logged step, which carries the
  one-off allocations and kernel warm-up) = their tokens / their summed step time / num_gpus;
- MFU over the same steps = the step-time-weighted mean of the per-step MFU (each step's MFU is
  its tokens/s/GPU times the same FLOPs-per-token / peak constant, so this is that constant times
  the tokens/s/GPU above);
- measured peak memory: the largest per-step peak (the CUDA allocator's peaks are running
  maxima; on CPU the resident set), per rank where the records carry ``*_per_rank`` lists.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .planner.schema import Plan

METRICS_FILE = "metrics.jsonl"
#: measured peak keys, the first present is the one compared with the plan's prediction
PEAK_KEYS = ("peak_allocated_bytes", "peak_rss_bytes")


class ReportError(ValueError):
    """A run folder whose metrics or plan cannot be read (one line, exit 2)."""

    exit_code = 2


@dataclass(frozen=True)
class StepRecord:
    """The fields of one metrics.jsonl line the report uses."""

    step: int
    loss: float
    step_time_s: float
    tokens_per_s_per_gpu: float
    mfu: float | None
    loss_tokens: int | None
    unix_time_s: float | None
    peaks: dict  # name -> bytes (max over ranks), e.g. peak_allocated_bytes
    peaks_per_rank: dict  # name -> tuple of bytes, one per rank (absent for older records)


@dataclass(frozen=True)
class MemoryRow:
    """One measured peak against the plan's predicted per-GPU total."""

    name: str  # peak_allocated_bytes, peak_reserved_bytes or peak_rss_bytes
    measured_bytes: int  # the largest over ranks and steps
    per_rank_bytes: tuple[int, ...]  # empty when the records have no per-rank values
    predicted_bytes: int | None

    @property
    def ratio(self) -> float | None:
        """measured / predicted."""
        return self.measured_bytes / self.predicted_bytes if self.predicted_bytes else None


@dataclass(frozen=True)
class TimeSplit:
    """Where the time went: in the steps, and (with wall-clock stamps) outside them."""

    step_s: float  # sum of all logged step times
    first_step_s: float
    steady_step_s: float | None  # mean step time after the first logged step
    predicted_step_s: float | None
    predicted_compute_s: float | None
    predicted_exposed_comm_s: float | None
    wall_s: float | None  # from the first step's start to the last step's log, when stamped
    outside_steps_s: float | None  # wall_s - step_s: checkpoints, logging, data


@dataclass(frozen=True)
class RunReport:
    run_dir: str
    model: str
    gpu: str
    num_gpus: int
    seq_len: int
    steps_logged: int
    first_step: int
    last_step: int
    planned_steps: int | None  # training.max_steps; None when set by epochs
    tokens_per_step: int
    tokens: int  # steps logged x tokens per step
    loss_tokens: int | None  # real (non-padding) target tokens, summed
    first_loss: float
    last_loss: float
    tokens_per_s_per_gpu: float  # steady steps
    predicted_tokens_per_s_per_gpu: float | None
    mfu: float | None
    predicted_mfu: float | None
    memory: tuple[MemoryRow, ...]
    time: TimeSplit
    losses: tuple[tuple[int, float], ...]  # (step, loss) for the chart

    @property
    def throughput_ratio(self) -> float | None:
        """measured / predicted tokens/s/GPU."""
        p = self.predicted_tokens_per_s_per_gpu
        return self.tokens_per_s_per_gpu / p if p else None

    @property
    def mfu_ratio(self) -> float | None:
        return self.mfu / self.predicted_mfu if self.mfu is not None and self.predicted_mfu else None

    def to_dict(self) -> dict:
        """The JSON form (``ltune report --json``): the fields, ratios added, losses as lists."""
        out = asdict(self)
        out["losses"] = [list(p) for p in self.losses]
        out["throughput_ratio"] = self.throughput_ratio
        out["mfu_ratio"] = self.mfu_ratio
        for row, d in zip(self.memory, out["memory"]):
            d["per_rank_bytes"] = list(row.per_rank_bytes)
            d["ratio"] = row.ratio
        return out


def _record(raw: dict, where: str) -> StepRecord:
    """One parsed line; a ReportError naming the line when a field is missing or of the wrong type."""
    try:
        peaks = {k: int(v) for k, v in raw.items() if k.startswith("peak_") and k.endswith("_bytes")}
        per_rank = {
            k[: -len("_per_rank")]: tuple(int(x) for x in v)
            for k, v in raw.items() if k.startswith("peak_") and k.endswith("_bytes_per_rank")
        }
        mfu = raw.get("mfu")
        loss_tokens = raw.get("loss_tokens")
        stamp = raw.get("unix_time_s")
        return StepRecord(
            step=int(raw["step"]), loss=float(raw["loss"]), step_time_s=float(raw["step_time_s"]),
            tokens_per_s_per_gpu=float(raw["tokens_per_s_per_gpu"]),
            mfu=None if mfu is None else float(mfu),
            loss_tokens=None if loss_tokens is None else int(loss_tokens),
            unix_time_s=None if stamp is None else float(stamp),
            peaks=peaks, peaks_per_rank=per_rank,
        )
    except KeyError as e:
        raise ReportError(f"{where}: no {e.args[0]!r} field") from None
    except (TypeError, ValueError) as e:
        raise ReportError(f"{where}: a field of the wrong type ({e})") from None


def read_metrics(path: Path) -> tuple[list[StepRecord], dict]:
    """The step records of metrics.jsonl and the last line's predicted_* fields; a ReportError
    for a missing or empty file, or a torn / non-JSON line (named by its number)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file (the run logged no step)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot be read ({e.__class__.__name__})") from None
    records, predictions = [], {}
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            raw = json.loads(line)
        except ValueError:
            raise ReportError(f"{where}: not a JSON line (a write cut short?)") from None
        if not isinstance(raw, dict):
            raise ReportError(f"{where}: not a JSON object")
        records.append(_record(raw, where))
        predictions = {k: v for k, v in raw.items() if k.startswith("predicted_")}
    if not records:
        raise ReportError(f"{path}: no step logged")
    return records, predictions


def load_run(run_dir: str | Path) -> tuple[Plan, list[StepRecord], dict]:
    """The run folder's plan, step records and logged predictions (ReportError on any failure)."""
    from .planner.io import PlanError, load_plan

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run folder")
    plan_file = run_dir / "plan.yaml"
    if not plan_file.is_file():
        raise ReportError(f"{plan_file}: no such file")
    try:
        plan = load_plan(plan_file)
    except PlanError as e:
        raise ReportError(str(e)) from None
    records, predictions = read_metrics(run_dir / METRICS_FILE)
    return plan, records, predictions


def tokens_per_step(plan: Plan) -> int:
    """micro_batch_size x gradient_accumulation_steps x data-parallel ranks x seq_len (loop.py)."""
    layout, training = plan.layout, plan.training
    dp_size = layout.num_gpus // layout.sp_degree
    return layout.micro_batch_size * training.gradient_accumulation_steps * dp_size * training.seq_len


def _prediction(plan: Plan, logged: dict, key: str, attr: tuple[str, str]):
    """The trainer's logged prediction, else the plan's own (None when neither has it)."""
    if logged.get(key) is not None:
        return logged[key]
    if plan.prediction is None:
        return None
    section, name = attr
    return getattr(getattr(plan.prediction, section), name)


def _memory_rows(records: list[StepRecord], predicted_bytes: int | None) -> tuple[MemoryRow, ...]:
    names: list[str] = []
    for r in records:
        names += [k for k in r.peaks if k not in names]
    rows = []
    for name in names:
        measured = max(r.peaks[name] for r in records if name in r.peaks)
        per_rank: tuple[int, ...] = ()
        lists = [r.peaks_per_rank[name] for r in records if name in r.peaks_per_rank]
        if lists and all(len(x) == len(lists[0]) for x in lists):
            per_rank = tuple(max(col) for col in zip(*lists))
        rows.append(MemoryRow(name, measured, per_rank, predicted_bytes))
    return tuple(rows)


def _time_split(plan: Plan, records: list[StepRecord]) -> TimeSplit:
    step_s = sum(r.step_time_s for r in records)
    steady = records[1:]
    throughput = plan.prediction.throughput if plan.prediction is not None else None
    wall = outside = None
    if records[0].unix_time_s is not None and records[-1].unix_time_s is not None:
        wall = records[-1].unix_time_s - (records[0].unix_time_s - records[0].step_time_s)
        outside = max(0.0, wall - step_s)
    return TimeSplit(
        step_s=step_s,
        first_step_s=records[0].step_time_s,
        steady_step_s=sum(r.step_time_s for r in steady) / len(steady) if steady else None,
        predicted_step_s=throughput.step_time_s if throughput else None,
        predicted_compute_s=throughput.compute_s if throughput else None,
        predicted_exposed_comm_s=throughput.exposed_comm_s if throughput else None,
        wall_s=wall,
        outside_steps_s=outside,
    )


def build_report(plan: Plan, records: list[StepRecord], predictions: dict, run_dir: str = "") -> RunReport:
    """The summary of ``records`` against ``plan`` (see the module docstring for each number)."""
    if not records:
        raise ReportError(f"{run_dir or 'metrics'}: no step logged")
    per_step = tokens_per_step(plan)
    num_gpus = plan.layout.num_gpus
    steady = records[1:] or records
    steady_time = sum(r.step_time_s for r in steady)
    if steady_time <= 0:
        raise ReportError(f"{run_dir or 'metrics'}: step times sum to {steady_time} s")
    mfus = [r.mfu for r in steady]
    mfu = None if any(m is None for m in mfus) else sum(m * r.step_time_s for m, r in zip(mfus, steady)) / steady_time
    loss_tokens = [r.loss_tokens for r in records]
    predicted_peak = _prediction(plan, predictions, "predicted_peak_bytes", ("memory", "total_bytes"))
    return RunReport(
        run_dir=str(run_dir),
        model=plan.model.name,
        gpu=plan.hardware.gpu,
        num_gpus=num_gpus,
        seq_len=plan.training.seq_len,
        steps_logged=len(records),
        first_step=records[0].step,
        last_step=records[-1].step,
        planned_steps=plan.training.max_steps,
        tokens_per_step=per_step,
        tokens=per_step * len(records),
        loss_tokens=None if any(t is None for t in loss_tokens) else sum(loss_tokens),
        first_loss=records[0].loss,
        last_loss=records[-1].loss,
        tokens_per_s_per_gpu=per_step * len(steady) / steady_time / num_gpus,
        predicted_tokens_per_s_per_gpu=_prediction(
            plan, predictions, "predicted_tokens_per_s_per_gpu", ("throughput", "tokens_per_s_per_gpu")),
        mfu=mfu,
        predicted_mfu=_prediction(plan, predictions, "predicted_mfu", ("throughput", "mfu")),
        memory=_memory_rows(records, None if predicted_peak is None else int(predicted_peak)),
        time=_time_split(plan, records),
        losses=tuple((r.step, r.loss) for r in records),
    )


def report_run(run_dir: str | Path) -> RunReport:
    """Read RUN_DIR's plan.yaml and metrics.jsonl and summarise them."""
    plan, records, predictions = load_run(run_dir)
    return build_report(plan, records, predictions, str(run_dir))
