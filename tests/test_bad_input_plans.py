"""plan.yaml files, mutated: a Plan or one PlanError line naming the field, never a crash;
through `ltune launch PLAN --dry-run` (the real path: load, paths, data, the planner's fit
re-check, node layout): exit 0, 1 or 2 with one line on error, never a traceback."""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from _fuzz import BAD_BYTES, CASES, DEEP_DOCS, HUGE_INT, mutate_mapping, nasty_scalars, nasty_values, one_line
from conftest import make_plan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ltune.cli import app
from ltune.planner.fit import check_fit
from ltune.planner.io import PlanError, load_plan
from ltune.planner.schema import Plan
from ltune.profiles import ProfileError

runner = CliRunner()

#: a valid plan (cpu target, tiny model), its data and tokenizer relative to the plan file
VALID = make_plan(
    training={"data": ["data/a.jsonl"], "output_dir": "runs/fuzz"}, model={"tokenizer": "tok"}
).model_dump(mode="json")


@pytest.fixture(scope="module")
def plan_dir():
    """A folder with the valid plan's data and tokenizer; the current folder while the tests run."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "data").mkdir()
        (root / "data" / "a.jsonl").write_text('{"text": "hello world"}\n')
        (root / "tok").mkdir()
        (root / "tok" / "tokenizer.json").write_text("{}")
        os.chdir(root)
        try:
            yield root
        finally:
            os.chdir(old)


def _text(data) -> bytes:
    """A document as plan.yaml text (lone surrogates pass through as the bytes they escape)."""
    return yaml.safe_dump(data, sort_keys=False).encode("utf-8", "surrogatepass")


def _scalars(value):
    """Every scalar inside a dumped plan."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _scalars(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _scalars(v)
    else:
        yield value


#: control characters: C0, DEL, C1, Unicode line and paragraph separators
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _sensible(plan: Plan) -> None:
    """What an accepted plan must be: finite numbers; the strings that reach a path, a
    script or a process non-empty and without control characters; AdamW's betas in [0, 1),
    a learning rate in (0, 1], at most 64 processes on the cpu target (one machine)."""
    for v in _scalars(plan.model_dump(exclude={"prediction"})):
        assert not isinstance(v, float) or math.isfinite(v), v
    m, t = plan.model, plan.training
    for v in (m.name, m.path, m.tokenizer, t.output_dir, plan.hardware.gpu, *t.data):
        assert v is None or (v and not CONTROL.search(v)), repr(v)
    assert all(0 <= b < 1 for b in plan.training.betas), plan.training.betas
    assert 0 < plan.training.learning_rate <= 1
    assert plan.hardware.gpu.lower() != "cpu" or plan.layout.num_gpus <= 64


def _judge(raw: bytes, folder: Path) -> Plan | str:
    """load_plan's answer: the plan, or its one-line error (which names the file)."""
    path = folder / "plan.yaml"
    path.write_bytes(raw)
    try:
        plan = load_plan(path)
    except PlanError as e:
        assert one_line(str(e)) and str(path) in str(e), repr(str(e))
        return str(e)
    _sensible(plan)
    start = time.perf_counter()
    try:  # an accepted plan can be judged by the planner quickly (or names its unknown GPU)
        ev = check_fit(plan)
    except (PlanError, ProfileError) as e:
        assert one_line(str(e)), repr(str(e))
    else:
        assert ev.memory.total_bytes > 0 and math.isfinite(ev.throughput.step_time_s)
    assert time.perf_counter() - start < 1.0
    return plan


def _launch(folder: Path, *options: str) -> int:
    """`ltune launch plan.yaml --dry-run`: exit 0/1/2, never a traceback, one error line."""
    result = runner.invoke(app, ["launch", str(folder / "plan.yaml"), "--dry-run", *options])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 1, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code:
        assert one_line(result.stderr) and result.stderr.startswith("error:"), result.stderr
    return result.exit_code


def _leaves(data: dict, prefix: tuple = ()) -> list[tuple]:
    """Every scalar field path of a plan (lists such as training.data as one field)."""
    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            out += _leaves(value, prefix + (key,))
        else:
            out.append(prefix + (key,))
    return out


#: the plan's own fields (prediction holds the planner's output, not the user's input)
FIELDS = [p for p in _leaves(VALID) if p[0] != "prediction"]
BAD = [0, -1, 2**80, HUGE_INT, math.nan, math.inf, -math.inf, "12", [], {}, None, True, "\n", "é", 1.5]


def _set(data: dict, path: tuple, value) -> dict:
    out = dict(data)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = _set(out[path[0]], path[1:], value)
    return out


def _mutated(draw) -> dict:
    """The valid plan with one key replaced, removed or added anywhere (mutate_mapping), or
    one of its fields, chosen among all of them, given a hostile value."""
    if draw(st.booleans()):
        return mutate_mapping(VALID, draw)
    return _set(VALID, draw(st.sampled_from(FIELDS)), draw(nasty_values))


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_mutated_plan_loads_or_names_one_line(plan_dir, data):
    CASES["plan.yaml"] += 1
    _judge(_text(_mutated(data.draw)), plan_dir)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_mutated_plan_through_launch_dry_run(plan_dir, data):
    CASES["plan.yaml"] += 1
    field = data.draw(st.sampled_from(FIELDS))  # one field, one hostile scalar: often accepted
    (plan_dir / "plan.yaml").write_bytes(_text(_set(VALID, field, data.draw(nasty_scalars))))
    if _launch(plan_dir) == 0:  # launched: then the plan made sense
        _sensible(load_plan(plan_dir / "plan.yaml"))


@pytest.mark.parametrize("value", BAD, ids=repr)
@pytest.mark.parametrize("field", FIELDS, ids=".".join)
def test_a_bad_value_is_named_by_its_field(plan_dir, field, value):
    """Each field with each bad value: accepted as sensible, or the error names the field."""
    CASES["plan.yaml"] += 1
    got = _judge(_text(_set(VALID, field, value)), plan_dir)
    if isinstance(got, Plan):  # accepted: the real path takes it too (or refuses it in one line)
        _launch(plan_dir)
    else:
        assert ".".join(field) in got or f"{field[-1]} (" in got or all(f in got for f in field[-2:]), got


@pytest.mark.parametrize("field", [p for p in FIELDS if p[-1] != "schema_version"], ids=".".join)
def test_a_missing_field_is_named_or_has_a_default(plan_dir, field):
    CASES["plan.yaml"] += 1
    data = _set(VALID, field, None)
    parent = data
    for key in field[:-1]:
        parent = parent[key]
    del parent[field[-1]]
    got = _judge(_text(data), plan_dir)
    if isinstance(got, str):
        assert ".".join(field) in got and "missing" in got or "max_steps or epochs" in got, got


@pytest.mark.parametrize("raw", [d.encode() for d in DEEP_DOCS] + list(BAD_BYTES) + [
    b"", b"null", b"[1, 2]", b"plan", b"{", b"\t", "schema_version: 1\nmodel: {name: caf\u00e9}\n".encode("utf-16"),
    b"schema_version: " + b"9" * 5000 + b"\n", b"schema_version: .inf\n", b"schema_version: [1]\n",
    b"schema_version: true\n", b"a: &a [*a]\n", b"!!python/object/apply:os.system ['true']\n",
], ids=lambda raw: repr(raw[:20]))
def test_broken_files(plan_dir, raw):
    CASES["plan.yaml"] += 1
    assert isinstance(_judge(raw, plan_dir), str)
    assert _launch(plan_dir) == 2


@pytest.mark.parametrize("field, value", [
    (("layout", "num_gpus"), 64), (("layout", "num_gpus"), 1), (("training", "seq_len"), 2**27),
    (("layout", "micro_batch_size"), 2**16), (("hardware", "gpu"), "h100-80g"), (("hardware", "gpu"), "CPU"),
    (("layout", "attention"), "eager"), (("training", "max_steps"), 10**9),
], ids=repr)
def test_extreme_but_valid_plans_launch_fast(plan_dir, field, value):
    """The largest values the schema accepts are judged quickly: fits (0) or does not (1)."""
    CASES["plan.yaml"] += 1
    data = _set(VALID, field, value)
    if field == ("hardware", "gpu") and value != "CPU":
        data = _set(data, ("layout", "num_gpus"), 8)
    (plan_dir / "plan.yaml").write_bytes(_text(data))
    assert _launch(plan_dir, "--nnodes", "1") in (0, 1)  # the cpu target's 'nodes' on this machine
