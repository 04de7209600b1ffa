"""Command-line options, hostile values: `ltune plan`, `ltune trace` (its parsing and
validation; the trace itself is stubbed) and `ltune launch --dry-run`. Each case exits 2
with one `error: ...` line, or 0/1 when the value is valid; never a traceback, never slow."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
from _fuzz import CASES, HUGE_INT, nasty_scalars, one_line
from conftest import make_plan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ltune.cli import app
from ltune.planner.io import dump_plan

runner = CliRunner()

#: seconds one case may take (the search and the fit check are closed-form)
SLOW_S = 3.0


def _as_text(value) -> str:
    """A value as a command line would carry it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and abs(value) >= 10**4000:
        return str(value)[:4000]
    return value if isinstance(value, str) else str(value)


#: option values as strings: every nasty scalar, and the numbers that broke parsing
values = st.one_of(
    nasty_scalars.map(_as_text),
    st.sampled_from(["9" * 400, "9" * 5000, "-" + "9" * 400, "1e400", "-1e400", "inf", "-inf", "nan", "NaN",
                     "", " ", "0", "-0", "1.5", "0x10", "1_000", "٣", "\uff11", "1e-400", str(HUGE_INT),
                     "[/]", "[bold]x", "x\x85y", "a\u2028b"]),
)


@pytest.fixture(scope="module")
def folder():
    """A deep temporary folder, the current folder while the tests run, with a valid plan's
    data and tokenizer (a value such as ../../x stays inside it)."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        here = Path(d, "a", "b", "c", "d", "e", "f", "g")
        (here / "data").mkdir(parents=True)
        (here / "data" / "a.jsonl").write_text('{"text": "hello world"}\n')
        (here / "tok").mkdir()
        (here / "tok" / "tokenizer.json").write_text("{}")
        (here / "a-folder").mkdir()
        dump_plan(make_plan(training={"data": ["data/a.jsonl"], "output_dir": "runs/fuzz"}, model={"tokenizer": "tok"}),
                  here / "plan.yaml")
        os.chdir(here)
        try:
            yield here
        finally:
            os.chdir(old)


def _run(args: list[str]) -> int:
    """One command: exit 0/1/2, no traceback, exit 2 is one `error:` line, and quick."""
    start = time.perf_counter()
    result = runner.invoke(app, args)
    took = time.perf_counter() - start
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert result.exit_code in (0, 1, 2), (args, result.output)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert one_line(result.stderr) and result.stderr.startswith("error:"), (args, result.stderr)
    assert took < SLOW_S, (args, took)
    return result.exit_code


# ---------------------------------------------------------------- plan

PLAN = ["plan", "-m", "qwen2.5-0.5b", "--ctx", "4096"]
PLAN_OPTIONS = ["--model", "--ctx", "--gpu", "--gpus", "--max-gpus", "--zero-stage", "--sp-degree", "--offload",
                "--loss", "--recompute", "--micro-batch", "--attention", "--precision", "--host-mem-gib",
                "--safety-margin", "--loss-chunk-tokens", "--steps", "--lr", "--data", "--tokenizer", "--model-path"]


def _safe_output(value: str) -> str:
    """An -o value that cannot leave the test folder: no separators, no '..'."""
    return value.replace("/", "_").replace("..", "_")


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(option=st.sampled_from(PLAN_OPTIONS + ["--output"]), value=values)
def test_plan_option_values(folder, option, value):
    CASES["options"] += 1
    if option == "--output":
        value = _safe_output(value)
        _run([*PLAN, "--output", value, "--data", "data/a.jsonl"])
        return
    # the option given last wins; --data, --tokenizer and --model-path are checked for -o
    extra = ["-o", "out.yaml"] if option in ("--data", "--tokenizer", "--model-path", "--lr", "--steps") else []
    _run([*PLAN, *extra, option, value])


@pytest.mark.parametrize("output", ["", ".", "a-folder", "a-folder/", "missing/plan.yaml", "x" * 300,
                                    "a\nb.yaml", "\x00", "plan.yaml.tmp", "é.yaml"], ids=repr)
def test_plan_output_targets(folder, output):
    CASES["options"] += 1
    before = sorted(p.name for p in folder.iterdir())
    code = _run([*PLAN, "-o", output])
    if code == 2:  # refused: nothing written, no temporary file left behind
        assert sorted(p.name for p in folder.iterdir()) == before
    else:
        (folder / output).unlink()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- trace (the trace itself stubbed)

TRACE = ["trace", "-m", "qwen2.5-0.5b", "--ctx", "4096"]
TRACE_OPTIONS = ["--model", "--ctx", "--gpu", "--gpus", "--zero-stage", "--sp-degree", "--offload", "--loss",
                 "--recompute", "--micro-batch", "--attention", "--precision", "--loss-chunk-tokens", "--num-docs",
                 "--plan"]


@pytest.fixture(scope="module")
def stub_trace():
    """trace_memory replaced by a stub that refuses: a valid command ends with `error: traced`."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import ltune.trace

    real = ltune.trace.trace_memory

    def traced(*args, **kwargs):
        raise ValueError("traced")

    ltune.trace.trace_memory = traced
    yield
    ltune.trace.trace_memory = real


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(option=st.sampled_from(TRACE_OPTIONS), value=values)
def test_trace_option_values(folder, stub_trace, option, value):
    CASES["options"] += 1
    _run([*TRACE, option, value] if option != "--plan" else ["trace", "--plan", value])


# ---------------------------------------------------------------- launch --dry-run

LAUNCH_OPTIONS = ["--launcher", "--hostfile", "--nnodes", "--node-rank", "--master-addr", "--master-port",
                  "--run-dir", "PLAN"]


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(option=st.sampled_from(LAUNCH_OPTIONS), value=values,
       launcher=st.sampled_from(["deepspeed", "torchrun", "slurm"]))
def test_launch_dry_run_option_values(folder, option, value, launcher):
    CASES["options"] += 1
    if option == "PLAN":
        _run(["launch", value, "--dry-run"])
    else:
        _run(["launch", "plan.yaml", "--dry-run", "--launcher", launcher, option, value])


@pytest.mark.parametrize("args", [
    ["plan"], ["plan", "--ctx"], ["plan", "--bogus"], ["plna"], ["launch"], ["launch", "a", "b"],
    ["trace", "--num-docs", "x"], ["plan", "-m", "x", "--ctx", "1", "--json=3"], ["launch", "plan.yaml", "--dry-run=1"],
    ["check"], ["models", "extra"],
], ids=" ".join)
def test_usage_errors_are_one_line(folder, args):
    """A missing, unknown or malformed option: one `error:` line and exit 2 (no usage box)."""
    CASES["options"] += 1
    assert _run(args) == 2


def test_help_still_works(folder):
    for command in ([], ["plan"], ["launch"], ["trace"], ["check"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, result.output
