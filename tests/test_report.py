"""`ltune report`, the trainer's live progress and `ltune trace`'s phases.

The report's numbers are worked out here by hand from a small synthetic metrics.jsonl and plan
(the trainer's record fields, ltune/trainer/loop.py), not from the report's own formulas."""

from __future__ import annotations

import json

import pytest
from _fuzz import one_line
from conftest import make_plan, tiny_arch
from typer.testing import CliRunner

from ltune.cli import app
from ltune.planner.io import dump_plan
from ltune.planner.schema import Prediction
from ltune.report import ReportError, report_run

GIB = 2**30
runner = CliRunner()

# 2 GPUs, sp 1 (2 data-parallel ranks), 2 sequences per micro batch, 3 micro batches, 128 tokens:
# 2 x 3 x 2 x 128 = 1536 tokens per optimizer step
TOKENS_PER_STEP = 1536
STEP_TIMES = [2.0, 0.5, 0.25, 0.25]  # the first step carries the warm-up
LOSSES = [6.0, 5.0, 4.5, 4.0]
LOSS_TOKENS = [1500, 1490, 1480, 1470]
MFUS = [0.01, 0.04, 0.08, 0.08]  # each step's tokens/s/GPU x the same FLOPs-per-token / peak
# peak resident bytes per rank after each step (running maxima, as ru_maxrss is)
PER_RANK = [[3 * GIB // 4, 5 * GIB // 4], [GIB, 5 * GIB // 4], [GIB, 3 * GIB // 2], [GIB, 3 * GIB // 2]]
# wall clock when each step was logged: a 2 s checkpoint between step 3 and step 4's log
STAMPS = [1000.0, 1000.5, 1000.75, 1003.0]


def _plan(with_prediction: bool = True):
    plan = make_plan(
        arch=tiny_arch(),
        layout={"num_gpus": 2, "zero_stage": 3, "micro_batch_size": 2},
        training={"seq_len": 128, "max_steps": 4, "gradient_accumulation_steps": 3},
    )
    if not with_prediction:
        return plan
    memory = dict(terms={"weights": 2 * GIB}, total_bytes=2 * GIB, capacity_bytes=8 * GIB, usable_bytes=7 * GIB,
                  host_bytes_per_node=0, host_capacity_bytes_per_node=2**34)
    throughput = dict(step_time_s=0.6, tokens_per_s_per_gpu=2880.0, mfu=0.075, compute_s=0.5,
                      exposed_comm_s=0.1, flops_per_token=1e9)
    prediction = Prediction.model_validate({"memory": memory, "throughput": throughput, "safety_margin": 0.1})
    return plan.model_copy(update={"prediction": prediction})


def _records(logged_prediction: bool = True) -> list[dict]:
    out = []
    for i, t in enumerate(STEP_TIMES):
        record = {
            "step": i + 1, "loss": LOSSES[i], "lr": 1e-3, "grad_norm": 1.0,
            "tokens_per_s_per_gpu": TOKENS_PER_STEP / t / 2, "mfu": MFUS[i], "step_time_s": t,
            "loss_tokens": LOSS_TOKENS[i], "step_applied": True,
            "peak_rss_bytes": max(PER_RANK[i]), "peak_rss_bytes_per_rank": PER_RANK[i],
            "unix_time_s": STAMPS[i],
        }
        if logged_prediction:
            record.update(predicted_peak_bytes=2 * GIB, predicted_tokens_per_s_per_gpu=2880.0, predicted_mfu=0.075)
        out.append(record)
    return out


def _run_dir(tmp_path, records=None, plan=None, name="run"):
    run = tmp_path / name
    run.mkdir()
    dump_plan(plan or _plan(), run / "plan.yaml")
    lines = [json.dumps(r) for r in (records if records is not None else _records())]
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run


def test_report_numbers_by_hand(tmp_path):
    r = report_run(_run_dir(tmp_path))
    assert (r.steps_logged, r.first_step, r.last_step, r.planned_steps) == (4, 1, 4, 4)
    assert r.tokens_per_step == TOKENS_PER_STEP
    assert r.tokens == 4 * 1536 == 6144
    assert r.loss_tokens == 5940
    assert (r.first_loss, r.last_loss) == (6.0, 4.0)
    # steady steps 2..4: 3 x 1536 tokens in 0.5 + 0.25 + 0.25 = 1 s on 2 GPUs
    assert r.tokens_per_s_per_gpu == pytest.approx(2304.0)
    assert r.throughput_ratio == pytest.approx(2304 / 2880)  # 0.8
    # step-time-weighted MFU: (0.04 x 0.5 + 0.08 x 0.25 + 0.08 x 0.25) / 1 s
    assert r.mfu == pytest.approx(0.06)
    assert r.mfu_ratio == pytest.approx(0.8)
    [row] = r.memory
    assert row.name == "peak_rss_bytes"
    assert row.per_rank_bytes == (GIB, 3 * GIB // 2)
    assert row.measured_bytes == 3 * GIB // 2
    assert row.predicted_bytes == 2 * GIB and row.ratio == pytest.approx(0.75)
    t = r.time
    assert t.step_s == pytest.approx(3.0) and t.first_step_s == 2.0
    assert t.steady_step_s == pytest.approx(1 / 3)
    # the first step started at 1000 - 2 = 998; the last was logged at 1003
    assert t.wall_s == pytest.approx(5.0) and t.outside_steps_s == pytest.approx(2.0)
    assert (t.predicted_step_s, t.predicted_compute_s, t.predicted_exposed_comm_s) == (0.6, 0.5, 0.1)
    assert r.losses == tuple(zip([1, 2, 3, 4], LOSSES))


def test_report_takes_the_plans_prediction_when_none_was_logged(tmp_path):
    """Older records carry no predicted_* fields, per-rank lists or stamps: the plan's own prediction."""
    records = _records(logged_prediction=False)
    for rec in records:
        del rec["peak_rss_bytes_per_rank"], rec["unix_time_s"]
    r = report_run(_run_dir(tmp_path, records))
    assert r.predicted_tokens_per_s_per_gpu == 2880.0 and r.predicted_mfu == 0.075
    assert r.memory[0].predicted_bytes == 2 * GIB and r.memory[0].per_rank_bytes == ()
    assert r.time.wall_s is None and r.time.outside_steps_s is None
    r = report_run(_run_dir(tmp_path, records, plan=_plan(with_prediction=False), name="bare"))
    assert r.predicted_tokens_per_s_per_gpu is None and r.throughput_ratio is None
    assert r.memory[0].ratio is None and r.time.predicted_step_s is None


def test_report_json_shape(tmp_path):
    result = runner.invoke(app, ["report", str(_run_dir(tmp_path)), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tokens"] == 6144 and data["steps_logged"] == 4
    assert data["tokens_per_s_per_gpu"] == pytest.approx(2304.0)
    assert data["throughput_ratio"] == pytest.approx(0.8) and data["mfu_ratio"] == pytest.approx(0.8)
    assert data["memory"] == [{"name": "peak_rss_bytes", "measured_bytes": 3 * GIB // 2,
                               "per_rank_bytes": [GIB, 3 * GIB // 2], "predicted_bytes": 2 * GIB, "ratio": 0.75}]
    assert set(data["time"]) == {"step_s", "first_step_s", "steady_step_s", "predicted_step_s", "predicted_compute_s",
                                 "predicted_exposed_comm_s", "wall_s", "outside_steps_s"}
    assert data["losses"] == [[1, 6.0], [2, 5.0], [3, 4.5], [4, 4.0]]


def test_report_text(tmp_path):
    result = runner.invoke(app, ["report", str(_run_dir(tmp_path))], terminal_width=200)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "4 steps logged (1..4 of 4)" in out and "6,144" in out
    assert "2,304" in out and "2,880" in out and "x0.80" in out
    assert "rank 1" in out and "x0.75" in out  # 1.5 GiB measured on rank 1 of 2 GiB predicted
    assert "2.0 s outside them" in out


@pytest.mark.parametrize("case", ["torn", "missing_metrics", "missing_plan", "empty", "bad_field", "no_folder"])
def test_report_unreadable_run_is_one_line_exit_2(tmp_path, case):
    run = _run_dir(tmp_path)
    metrics = run / "metrics.jsonl"
    if case == "torn":  # a kill mid-write
        metrics.write_text(metrics.read_text() + '{"step": 5, "lo')
    elif case == "missing_metrics":
        metrics.unlink()
    elif case == "missing_plan":
        (run / "plan.yaml").unlink()
    elif case == "empty":
        metrics.write_text("\n")
    elif case == "bad_field":
        metrics.write_text(json.dumps({**_records()[0], "step_time_s": "fast"}) + "\n")
    else:
        run = tmp_path / "nowhere"
    with pytest.raises(ReportError):
        report_run(run)
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 2, result.output
    assert one_line(result.stderr) and result.stderr.startswith("error:"), result.stderr
    if case == "torn":
        assert "metrics.jsonl:5" in result.stderr  # the line is named


def test_report_png_has_the_loss_and_memory_series(tmp_path):
    pytest.importorskip("matplotlib")
    from ltune.charts import report_chart

    run = _run_dir(tmp_path)
    out = tmp_path / "charts" / "report.png"
    result = runner.invoke(app, ["report", str(run), "--png", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = report_chart(report_run(run), tmp_path / "again.svg", fmt="svg")
    assert (tmp_path / "again.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    ax_loss, ax_mem = fig.axes
    [line] = ax_loss.get_lines()
    assert list(line.get_xdata()) == [1, 2, 3, 4] and list(line.get_ydata()) == LOSSES
    heights = [p.get_height() for p in ax_mem.patches]
    assert heights == pytest.approx([1.0, 1.5])  # GiB measured, rank 0 and rank 1
    predicted = [ln.get_ydata()[0] for ln in ax_mem.get_lines()]
    assert predicted == pytest.approx([2.0])  # the plan's 2 GiB


def test_report_png_needs_a_chart_suffix(tmp_path):
    pytest.importorskip("matplotlib")
    result = runner.invoke(app, ["report", str(_run_dir(tmp_path)), "--png", str(tmp_path / "chart.txt")])
    assert result.exit_code == 2 and one_line(result.stderr), result.output


# ---------------------------------------------------------------- live progress in `ltune launch`


def test_progress_mode_follows_the_launcher():
    from ltune.trainer.metrics import progress_mode

    assert progress_mode("tty", isatty=False) == "tty"  # the launcher's terminal, through a pipe
    assert progress_mode("plain", isatty=True) == "plain"
    assert progress_mode(" TTY ", isatty=False) == "tty"
    assert progress_mode(None, isatty=True) == "tty"  # run directly: our own stream decides
    assert progress_mode(None, isatty=False) == "plain"
    assert progress_mode("fancy", isatty=False) == "plain"


def test_progress_status_line():
    from ltune.trainer.metrics import progress_status

    record = {"loss": 2.34567, "tokens_per_s_per_gpu": 1234.4, "peak_allocated_bytes": 3 * GIB // 2,
              "peak_reserved_bytes": 2 * GIB, "predicted_peak_bytes": 5 * GIB // 2}
    assert progress_status(record) == "loss 2.3457  1234 tok/s/gpu  peak 1.50/2.50 GiB"
    record = {"loss": 1.0, "tokens_per_s_per_gpu": 10.0, "peak_rss_bytes": GIB}
    assert progress_status(record) == "loss 1.0000  10 tok/s/gpu  peak 1.00 GiB"


@pytest.mark.parametrize("value, live", [("tty", True), ("plain", False)])
def test_trainer_draws_a_live_line_only_in_tty_mode(tmp_path, monkeypatch, value, live):
    pytest.importorskip("torch")
    from ltune.trainer.loop import Trainer

    monkeypatch.setenv("LTUNE_PROGRESS", value)
    monkeypatch.setenv("RANK", "0")
    trainer = Trainer(tmp_path)
    trainer.total_steps = 4
    trainer.open_logs()
    try:
        assert (trainer.progress is not None) is live
        assert trainer.console.is_terminal is live
    finally:
        trainer.close_logs()


def test_launch_passes_the_terminal_to_the_trainer(plan_factory):
    from ltune.launcher.spec import NodeLayout, job_env

    plan = plan_factory(layout={"num_gpus": 2})
    nodes = NodeLayout(nnodes=1, nproc_per_node=2)
    assert job_env(plan, nodes, cpu_count=4, environ={}, progress="tty")["LTUNE_PROGRESS"] == "tty"
    assert "LTUNE_PROGRESS" not in job_env(plan, nodes, cpu_count=4, environ={})  # not a terminal
    assert "LTUNE_PROGRESS" not in job_env(plan, nodes, cpu_count=4, environ={}, local=False, progress="tty")  # slurm
    kept = job_env(plan, nodes, cpu_count=4, environ={"LTUNE_PROGRESS": "plain"}, progress="tty")
    assert "LTUNE_PROGRESS" not in kept  # the user's own setting reaches the job unchanged


# ---------------------------------------------------------------- `ltune trace` phases


def test_trace_reports_its_phases_in_order():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from ltune.planner.schema import Layout
    from ltune.trace import trace_memory
    from ltune.trace.tracer import PHASES

    seen = []
    trace_memory(tiny_arch(), 128, Layout(num_gpus=1, zero_stage=0), on_phase=seen.append)
    assert seen == ["model", "optimizer", "forward", "backward", "step", "shard"] == list(PHASES)
