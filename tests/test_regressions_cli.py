"""The plan-file and command-line defects found by generated bad input, one test each: what crashed, hung or was
accepted as nonsense, and what it gets now (exit 2 with one `error:` line naming the field)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from _fuzz import one_line
from conftest import make_plan
from typer.testing import CliRunner

from ltune.cli import app
from ltune.launcher import LaunchError, LaunchOptions, plan_launch
from ltune.job.paths import validate_plan_paths
from ltune.planner.io import PlanError, dump_plan, load_plan
from ltune.planner.search import sp_degrees
from ltune.profiles import load_model

runner = CliRunner()
PLAN = ["plan", "-m", "qwen2.5-0.5b", "--ctx", "4096"]


def _error(args: list[str], max_s: float = 2.0) -> str:
    """The command's one error line; it must exit 2 quickly without a traceback."""
    start = time.perf_counter()
    result = runner.invoke(app, args)
    assert time.perf_counter() - start < max_s
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert one_line(result.stderr) and result.stderr.startswith("error:"), result.stderr
    return result.stderr


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A plan folder with data and a (presence-only) tokenizer; the current folder."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _plan_dict(**sections) -> dict:
    data = make_plan(training={"data": ["data/a.jsonl"], "output_dir": "runs/r"},
                     model={"tokenizer": "tok"}).model_dump(mode="json")
    for section, fields in sections.items():
        data[section] = {**data[section], **fields}
    return data


def _write(folder: Path, data, name: str = "plan.yaml") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _plan_error(path: Path) -> str:
    with pytest.raises(PlanError) as err:
        load_plan(path)
    assert one_line(str(err.value)), str(err.value)
    return str(err.value)


# ---------------------------------------------------------------- numbers: infinite, NaN, hundreds of digits


def test_infinite_host_memory_option():
    """Was an OverflowError traceback (int(inf * GIB)), exit 1."""
    assert "--host-mem-gib" in _error([*PLAN, "--host-mem-gib", "inf"])
    assert "--host-mem-gib" in _error([*PLAN, "--host-mem-gib", "nan"])


def test_400_digit_context_option():
    """Was an OverflowError traceback (a 400-digit int converted to float), exit 1."""
    assert "--ctx: Input should be less than or equal to 134217728" in _error([*PLAN[:-1], "9" * 400])


@pytest.mark.parametrize("section, field, text", [
    ("training", "learning_rate", ".inf"), ("training", "learning_rate", ".nan"),
    ("training", "weight_decay", ".inf"), ("training", "max_grad_norm", ".nan"),
    ("hardware", "host_mem_gib", ".inf"), ("hardware", "host_mem_gib", ".nan"),
])
def test_infinite_and_nan_numbers_in_a_plan(workdir, section, field, text):
    """Were accepted (host_mem_gib .inf crashed the fit check with an OverflowError)."""
    path = _write(workdir, yaml.safe_dump(_plan_dict()) + "")
    data = yaml.safe_load(path.read_text())
    data[section][field] = "PLACEHOLDER"
    path.write_text(yaml.safe_dump(data).replace("PLACEHOLDER", text))
    assert f"{section}.{field}: Input should be a finite number" in _plan_error(path)


@pytest.mark.parametrize("betas", [[float("nan"), 2], [0.9, 1.0], [-0.1, 0.9], [0.9, float("inf")]])
def test_betas_must_be_finite_in_0_1(workdir, betas):
    """`betas: [.nan, 2]` was accepted and reached DeepSpeed's optimizer."""
    assert "training.betas." in _plan_error(_write(workdir, _plan_dict(training={"betas": betas})))


def test_learning_rate_inf_is_not_written(workdir):
    """`plan --lr inf -o` wrote `learning_rate: .inf` into the plan."""
    assert "--lr: Input should be a finite number (got inf)" in _error([*PLAN, "--lr", "inf", "-o", "p.yaml"])
    assert "--lr" in _error([*PLAN, "--lr", "10", "-o", "p.yaml"])
    assert not (workdir / "p.yaml").exists()


def test_integers_over_4300_digits_in_a_plan(workdir):
    """Was a ValueError traceback from int() (Python's 4,300-digit limit)."""
    path = _write(workdir, f"schema_version: 1\nlayout: {{num_gpus: {'9' * 5000}}}\n")
    assert "plan.yaml" in _plan_error(path)


# ---------------------------------------------------------------- files that are not plans


def test_a_binary_file_as_a_plan():
    """`ltune launch /bin/ls` (and trace --plan) were UnicodeDecodeError tracebacks."""
    binary = next(p for p in ("/bin/ls", "/bin/sh", "/usr/bin/env") if Path(p).is_file())
    assert "not UTF-8" in _error(["launch", binary, "--dry-run"])
    assert "not UTF-8" in _error(["trace", "--plan", binary])


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_plans_that_are_not_utf8(workdir, encoding):
    path = workdir / "plan.yaml"
    path.write_bytes(yaml.safe_dump(_plan_dict(model={"name": "café"}), allow_unicode=True).encode(encoding))
    assert "not UTF-8 text" in _plan_error(path)


@pytest.mark.parametrize("text", ["[" * 1000, "[" * 1000 + "]" * 1000, "model: " + "[" * 5000 + "]" * 5000,
                                  "training: {data: " + "[" * 900 + "]" * 900 + "}"], ids=len)
def test_deeply_nested_plan(workdir, text):
    """'[' * 1000 was a RecursionError traceback (yaml's composer recursed past Python's limit)."""
    assert "plan.yaml" in _plan_error(_write(workdir, text))
    assert "plan.yaml" in _error(["launch", "plan.yaml", "--dry-run"])


# ---------------------------------------------------------------- plan -o


def test_output_into_a_missing_folder(workdir):
    """Was a FileNotFoundError traceback after the search."""
    assert "--output: folder missing does not exist" in _error([*PLAN, "-o", "missing/plan.yaml"])
    assert list(workdir.iterdir()) == [workdir / "data", workdir / "tok"] or not list(workdir.glob("*.tmp"))


def test_output_onto_a_folder_leaves_nothing_behind(workdir):
    """Was an IsADirectoryError traceback that left `folder.tmp` behind."""
    (workdir / "out").mkdir()
    before = sorted(workdir.iterdir())
    assert "--output: out is a folder" in _error([*PLAN, "-o", "out"])
    assert sorted(workdir.iterdir()) == before


def test_empty_output(workdir):
    """`-o ''` was written as the folder '.' (IsADirectoryError traceback)."""
    before = sorted(workdir.iterdir())
    assert "--output: empty path" in _error([*PLAN, "-o", ""])
    assert sorted(workdir.iterdir()) == before


def test_output_does_not_follow_a_planted_tmp_link(workdir):
    """dump_plan wrote through `x.yaml.tmp`, a link planted to point elsewhere."""
    victim = workdir / "victim.txt"
    victim.write_text("keep me\n")
    (workdir / "x.yaml.tmp").symlink_to(victim)
    result = runner.invoke(app, [*PLAN, "-o", "x.yaml"])
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "keep me\n"
    assert not (workdir / "x.yaml").is_symlink() and load_plan(workdir / "x.yaml").model.name == "qwen2.5-0.5b"
    assert [p.name for p in workdir.iterdir() if p.name.endswith(".tmp")] == ["x.yaml.tmp"]


def test_dump_plan_replaces_a_link_at_the_target_not_its_target(workdir):
    victim = workdir / "victim.txt"
    victim.write_text("keep me\n")
    (workdir / "plan.yaml").symlink_to(victim)
    dump_plan(make_plan(), workdir / "plan.yaml")
    assert victim.read_text() == "keep me\n" and not (workdir / "plan.yaml").is_symlink()


# ---------------------------------------------------------------- GPU counts


def test_a_billion_gpus_is_refused_at_once():
    """`--gpus 1073741824` ran for a minute (sp_degrees counted to N)."""
    assert "--gpus: Input should be less than or equal to 65536" in _error([*PLAN, "--gpus", str(2**30)])


def test_a_400_digit_gpu_count_is_refused_at_once():
    """A 400-digit --gpus never ended, even with --sp-degree pinned."""
    assert "--gpus" in _error([*PLAN, "--gpus", "9" * 400, "--sp-degree", "2"])
    assert "--max-gpus" in _error([*PLAN, "--max-gpus", "9" * 400])


def test_sp_degrees_are_divisors_of_the_heads():
    """llama2-7b has 32 heads (and 32 kv heads): at 2**24 GPUs the degrees are 1, 2, 4, 8, 16, 32,
    found without counting to 2**24 (which took seconds; a 400-digit count never ended);
    at 24 GPUs, the common divisors of 24 and 32: 1, 2, 4, 8."""
    llama = load_model("llama2-7b")
    start = time.perf_counter()
    assert sp_degrees(llama, 2**24) == [1, 2, 4, 8, 16, 32]
    assert sp_degrees(llama, 24) == [1, 2, 4, 8]
    # qwen2.5-0.5b: 14 heads, 2 kv heads; sp must divide 14 and divide 2 or be a multiple of it
    assert sp_degrees(load_model("qwen2.5-0.5b"), 28) == [1, 2, 14]
    assert time.perf_counter() - start < 0.1


def test_the_largest_gpu_count_plans_quickly():
    start = time.perf_counter()
    result = runner.invoke(app, [*PLAN, "--gpus", "65536", "--json"])
    assert result.exit_code in (0, 1) and time.perf_counter() - start < 2.0


@pytest.mark.parametrize("gpu", ["cpu", "CPU"])
def test_the_cpu_target_runs_at_most_64_processes(workdir, gpu):
    """1,000,000 'GPUs' on the cpu target was accepted (plan and plan file)."""
    assert "--gpus: Input should be less than or equal to 65536" in _error([*PLAN, "--gpu", gpu, "--gpus", "1000000"])
    assert "--gpus (128) is more processes than the cpu target runs on one machine (64)" in _error(
        [*PLAN, "--gpu", gpu, "--gpus", "128"])
    path = _write(workdir, _plan_dict(layout={"num_gpus": 1_000_000}, hardware={"gpu": gpu}))
    assert "layout.num_gpus" in _plan_error(path)
    path = _write(workdir, _plan_dict(layout={"num_gpus": 128}, hardware={"gpu": gpu}))
    assert "layout.num_gpus (128) is more processes than the cpu target runs on one machine (64)" in _plan_error(path)


def test_the_cpu_search_stops_at_the_cpu_limit():
    """Unpinned, the cpu target's search tries at most 64 processes."""
    result = runner.invoke(app, ["plan", "-m", "llama2-70b", "--ctx", "131072", "--gpu", "cpu", "--json"])
    assert result.exit_code == 1
    import json

    assert max(s["num_gpus"] for s in json.loads(result.stdout)["shortfalls"]) == 64


# ---------------------------------------------------------------- strings that reach a path, a shell or a script


@pytest.mark.parametrize("section, field, value", [
    ("model", "name", "tiny\nrm -rf /"), ("model", "path", "w\x00"), ("model", "tokenizer", "tok\r"),
    ("training", "output_dir", "runs/\x1b[2Jx"), ("hardware", "gpu", "cpu\n"), ("training", "data", ["a\nb"]),
    ("model", "path", ""), ("training", "output_dir", ""),
])
def test_control_characters_and_empty_paths_are_refused(workdir, section, field, value):
    message = _plan_error(_write(workdir, _plan_dict(**{section: {field: value}})))
    assert f"{section}.{field}" in message


def test_control_characters_in_options(workdir):
    assert "--data" in _error([*PLAN, "-o", "p.yaml", "--data", "a\nb"])
    assert "--model" in _error(["plan", "-m", "x\ny", "--ctx", "4096"])
    _write(workdir, _plan_dict())
    assert "--run-dir" in _error(["launch", "plan.yaml", "--dry-run", "--run-dir", "r\nm"])
    assert "--master-addr" in _error(["launch", "plan.yaml", "--dry-run", "--master-addr", "h\x00"])


# ---------------------------------------------------------------- model.path


def test_a_missing_model_path_is_refused_at_launch(workdir):
    """model.path that did not exist was accepted until the trainer failed to load it."""
    path = _write(workdir, _plan_dict(model={"path": "no-such-model"}))
    plan = load_plan(path)
    assert validate_plan_paths(plan, workdir) == [f"model.path: folder {workdir / 'no-such-model'} not found"]
    assert f"model.path: folder {workdir / 'no-such-model'} not found" in _error(["launch", "plan.yaml"])
    dry = runner.invoke(app, ["launch", "plan.yaml", "--dry-run"])  # a dry run warns (issue 15)
    assert dry.exit_code == 0 and f"warning: model.path: folder {workdir / 'no-such-model'} not found" in dry.stderr
    (workdir / "no-such-model").mkdir()
    assert validate_plan_paths(plan, workdir) == []


def test_validate_plan_paths_names_each_missing_path(workdir):
    plan = load_plan(_write(workdir, _plan_dict(model={"tokenizer": "gone"}, training={"data": ["data/a.jsonl", "b"]})))
    assert validate_plan_paths(plan, workdir) == [
        f"model.tokenizer: folder {workdir / 'gone'} not found",
        f"training.data: {workdir / 'b'}: data file not found",
    ]


def test_a_home_folder_of_an_unknown_user(workdir):
    """`~nosuchuser/x` was a RuntimeError traceback in the launcher's path resolution."""
    path = _write(workdir, _plan_dict(model={"path": "~no-such-user-ltune/m"}))
    assert "model.path" in _error(["launch", str(path)])  # a dry run only warns (issue 15)
    with pytest.raises(LaunchError):
        plan_launch(load_plan(path), path, LaunchOptions(dry_run=True, run_dir="~no-such-user-ltune/r"))


def test_names_too_long_for_the_file_system(workdir):
    """--model and --run-dir of 400 characters were OSError (ENAMETOOLONG) tracebacks."""
    assert "unknown model '999" in _error(["plan", "-m", "9" * 400, "--ctx", "4096"])
    assert "File name too long" in _error(["plan", "-m", "9" * 400 + ".json", "--ctx", "4096"])
    _write(workdir, _plan_dict())
    assert "File name too long" in _error(["launch", "plan.yaml", "--dry-run", "--run-dir", "r" * 400])


# ---------------------------------------------------------------- usage errors and printing


@pytest.mark.parametrize("args, message", [
    ([*PLAN[:-1], "abc"], "Invalid value for '--ctx'"),
    (["plan", "--ctx", "4096"], "Missing option '--model'"),
    ([*PLAN, "--bogus"], "No such option: --bogus"),
    (["plna"], "No such command 'plna'"),
])
def test_usage_errors_are_one_line(args, message):
    """Were click's usage block inside typer's rich box (several lines, box characters)."""
    assert message in _error(args)


def test_markup_in_a_value_is_printed_as_it_is(workdir):
    """`--gpu '[/]'` was a rich MarkupError traceback while printing the error, and so was
    `launch --dry-run --run-dir '[/]'` while printing the run folder."""
    assert "unknown GPU '[/]'" in _error([*PLAN, "--gpu", "[/]"])
    _write(workdir, _plan_dict())
    result = runner.invoke(app, ["launch", "plan.yaml", "--dry-run", "--run-dir", "[/]"])
    assert result.exit_code == 0 and f"run folder {workdir / '[/]'}" in result.stdout, result.output


# ---------------------------------------------------------------- trust_remote_code


def test_trust_remote_code_is_warned_about_at_launch(workdir):
    _write(workdir, _plan_dict(model={"trust_remote_code": True}))
    result = runner.invoke(app, ["launch", "plan.yaml", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "warning: model.trust_remote_code is true" in result.stderr
    _write(workdir, _plan_dict())
    assert "trust_remote_code" not in runner.invoke(app, ["launch", "plan.yaml", "--dry-run"]).stderr


def test_trust_remote_code_is_warned_about_by_trace(workdir, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import ltune.trace

    def stub(*args, **kwargs):
        raise ValueError("stub: not traced")

    monkeypatch.setattr(ltune.trace, "trace_memory", stub)
    _write(workdir, _plan_dict(model={"trust_remote_code": True}))
    result = runner.invoke(app, ["trace", "--plan", "plan.yaml"])
    assert "warning: model.trust_remote_code is true" in result.stderr
    assert "error: stub: not traced" in result.stderr


def test_denormal_storage_bandwidth_is_refused(workdir):
    """hardware.storage_write_bytes_per_s 5e-324 (positive, denormal) made the save time infinite and
    `ltune launch --dry-run` crashed converting it to whole seconds; a bandwidth is now at least 1 byte/s."""
    plan = _write(workdir, _plan_dict(hardware={"storage_write_bytes_per_s": 5e-324}))
    assert "storage_write_bytes_per_s" in _error(["launch", str(plan), "--dry-run"])
