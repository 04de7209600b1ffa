"""`ltune check` for CI: folders, every plan checked, exit codes, other GPU targets, the JSON,
JUnit and GitHub outputs (escaping), drift against the stored prediction, auto-detection."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_plan
from ltune.cli import app
from ltune.planner.io import dump_plan, load_plan
from ltune.profiles import GIB, load_gpu, load_model

runner = CliRunner()


def write(plan, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    dump_plan(plan, path)
    return path


def small_plan(**overrides):
    """~100k parameters on 2 A100-80GB: fits with almost all the GPU to spare."""
    return make_plan(gpu="a100-80g", **overrides)


def huge_plan():
    """llama3.1-70b on one A100-80GB at ZeRO-0: its bf16 weights alone (2 bytes x 70.6e9 params
    = 131 GiB) exceed the GPU's 80 GiB, whatever the rest of the model says."""
    arch = load_model("llama3.1-70b")
    assert 2 * arch.num_params() > 80 * GIB
    return make_plan(arch=arch, gpu="a100-80g", layout={"num_gpus": 1, "zero_stage": 0})


def check(*args: str, env: dict | None = None):
    return runner.invoke(app, ["check", *args], env=env or {"GITHUB_ACTIONS": ""})


def check_json(*args: str) -> tuple[int, dict]:
    res = check(*args, "--format", "json")
    return res.exit_code, json.loads(res.stdout)


def by_where(data: dict) -> dict[tuple[str, str | None], dict]:
    return {(Path(r["path"]).name, r["target"]): r for r in data["results"]}


# ---------------------------------------------------------------- inputs and exit codes


def test_folders_are_searched_recursively_for_yaml_and_yml(tmp_path):
    write(small_plan(), tmp_path / "plans" / "a.yaml")
    write(small_plan(), tmp_path / "plans" / "team" / "deep" / "b.yml")
    write(small_plan(), tmp_path / "plans" / ".hidden" / "c.yaml")  # hidden folders are skipped
    (tmp_path / "plans" / "team" / "notes.txt").write_text("not a plan")
    code, data = check_json(str(tmp_path / "plans"))
    assert code == 0
    assert sorted(Path(r["path"]).name for r in data["results"]) == ["a.yaml", "b.yml"]
    assert data["summary"]["plans"] == 2 and data["summary"]["fits"] == 2


def test_missing_path_and_folder_without_plans_are_invalid(tmp_path):
    write(small_plan(), tmp_path / "ok.yaml")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    res = check(str(tmp_path / "nope"), str(tmp_path / "empty"), str(tmp_path / "ok.yaml"))
    assert res.exit_code == 2
    lines = res.stdout.splitlines()
    assert f"error: {tmp_path / 'nope'}: invalid: no such file or folder" in lines
    assert any(line.startswith(f"error: {tmp_path / 'empty'}: invalid: no plan files") for line in lines)
    assert any(line.startswith(f"fits: {tmp_path / 'ok.yaml'} on a100-80g: ") for line in lines)


@pytest.mark.parametrize(
    "names, expected",
    [
        (["fit"], 0),
        (["fit", "huge"], 1),
        (["bad", "huge", "fit"], 2),  # the bad one first: the others are still checked
        (["bad", "fit"], 2),
    ],
)
def test_exit_codes_and_every_plan_checked_after_a_bad_one(tmp_path, names, expected):
    files = {"fit": write(small_plan(), tmp_path / "fit.yaml"), "huge": write(huge_plan(), tmp_path / "huge.yaml")}
    files["bad"] = tmp_path / "bad.yaml"
    files["bad"].write_text("layout: [\n")
    res = check(*(str(files[n]) for n in names))
    assert res.exit_code == expected, res.output
    out = res.stdout.splitlines()
    verdicts = [line.split(":")[0] for line in out if line.startswith(("fits:", "does not fit:", "error:"))]
    want = {"fit": "fits", "huge": "does not fit", "bad": "error"}
    assert verdicts == [want[n] for n in names]
    if "bad" in names:
        assert f"error: {files['bad']}: invalid: not valid YAML at line 2" in out
    assert out[-1].endswith(f"exit {expected}")


def test_huge_plan_line_reports_total_usable_and_negative_headroom(tmp_path):
    path = write(huge_plan(), tmp_path / "huge.yaml")
    code, data = check_json(str(path), "--safety-margin", "0.25")
    assert code == 1
    (r,) = data["results"]
    assert r["verdict"] == "does_not_fit" and r["own_target"] is True
    assert r["usable_bytes"] == pytest.approx(0.75 * 80 * GIB, abs=1)  # A100-80GB less a 25% margin, by hand
    assert r["headroom_bytes"] == r["usable_bytes"] - r["total_bytes"] < -(131 - 60) * GIB
    assert r["headroom_pct"] == pytest.approx(100 * r["headroom_bytes"] / (60 * GIB), rel=1e-6)
    text = check(str(path), "--safety-margin", "0.25").stdout.splitlines()[0]
    gib_total = r["total_bytes"] / GIB
    assert text == (f"does not fit: {path} on a100-80g: {gib_total:,.2f} of 60.00 GiB usable, headroom "
                    f"{60 - gib_total:,.2f} GiB ({100 * (60 - gib_total) / 60:.1f}%)")


def test_safety_margin_defaults_to_the_plans_own_as_launch_does(tmp_path):
    out = tmp_path / "plan.yaml"
    assert runner.invoke(app, ["plan", "-m", "qwen2.5-0.5b", "--ctx", "4096", "--safety-margin", "0.2",
                               "-o", str(out)]).exit_code == 0
    bare = write(small_plan(), tmp_path / "bare.yaml")  # no prediction: the planner's 5%
    _, data = check_json(str(out), str(bare))
    r = {Path(x["path"]).name: x for x in data["results"]}
    assert r["plan.yaml"]["usable_bytes"] == pytest.approx(0.80 * 80 * GIB, abs=1)
    assert r["bare.yaml"]["usable_bytes"] == pytest.approx(0.95 * 80 * GIB, abs=1)
    assert (r["plan.yaml"]["safety_margin"], r["bare.yaml"]["safety_margin"]) == (0.2, 0.05)
    for bad in ("1", "-0.1", "nan"):
        res = check(str(out), "--safety-margin", bad)
        assert res.exit_code == 2 and "--safety-margin must be at least 0 and below 1" in res.output


# ---------------------------------------------------------------- other GPU targets


def test_gpu_targets_fit_do_not_fit_or_cannot_hold_the_layout(tmp_path):
    arch = load_model("llama3.1-8b")
    # model states alone, per GPU at ZeRO-3 over 4 GPUs: 16 bytes per parameter (bf16 weights 2 +
    # gradients 2, fp32 master 4, Adam 8) / 4 = 29.9 GiB, more than an RTX 4090 holds (24 GiB)
    assert 16 * arch.num_params() / 4 > load_gpu("rtx4090").hbm_bytes
    four = write(make_plan(arch=arch, gpu="a100-80g", layout={"num_gpus": 4}, training={"seq_len": 4096}),
                 tmp_path / "four.yaml")
    six = write(small_plan(layout={"num_gpus": 6}), tmp_path / "six.yaml")
    code, data = check_json(str(four), str(six), "--gpu", "H100-80G", "--gpu", "rtx4090", "--gpu", "a10",
                            "--gpu", "v100-32g", "--gpu", "a100-80g", "--gpu", "h100-80g")
    assert code == 2
    r = by_where(data)
    assert len(data["results"]) == 2 * 5  # own target + 4 others, the repeated ones checked once
    assert r["four.yaml", "a100-80g"]["verdict"] == "fits" and r["four.yaml", "a100-80g"]["own_target"]
    assert r["four.yaml", "h100-80g"]["verdict"] == "fits" and not r["four.yaml", "h100-80g"]["own_target"]
    assert r["four.yaml", "rtx4090"]["verdict"] == "does_not_fit"
    assert r["four.yaml", "a10"]["verdict"] in ("fits", "does_not_fit")  # 4 GPUs = one a10 node
    # 6 GPUs over nodes of 4 (a10) is not whole nodes; on nodes of 8 it is one node
    assert r["six.yaml", "a10"]["verdict"] == "invalid"
    assert r["six.yaml", "a10"]["error"] == "layout.num_gpus (6) is not a multiple of the GPUs per node (4) of a10"
    assert r["six.yaml", "rtx4090"]["verdict"] == "fits"
    for name in ("four.yaml", "six.yaml"):
        v100 = r[name, "v100-32g"]
        assert v100["verdict"] == "invalid" and "no bf16" in v100["error"]
    # the stored prediction's drift is only judged on the plan's own GPU
    assert all(x["drift_pct"] is None for x in data["results"] if not x["own_target"])


def test_unknown_gpu_target_is_one_line_exit_2(tmp_path):
    path = write(small_plan(), tmp_path / "p.yaml")
    res = check(str(path), "--gpu", "h100-80")
    assert res.exit_code == 2
    (line,) = res.output.strip().splitlines()
    assert line.lower().startswith("error: --gpu: unknown gpu 'h100-80'") and "h100-80g" in line


# ---------------------------------------------------------------- output formats


def test_json_shape_and_summary(tmp_path):
    write(small_plan(), tmp_path / "fit.yaml")
    write(huge_plan(), tmp_path / "huge.yaml")
    (tmp_path / "bad.yaml").write_text("schema_version: 1\n")
    code, data = check_json(str(tmp_path), "--gpu", "h200")
    assert code == 2
    assert set(data) == {"results", "options", "summary"}
    keys = {"path", "target", "own_target", "verdict", "error", "layout", "memory", "safety_margin",
            "stored_total_bytes", "drift_pct", "drifted", "warnings", "total_bytes", "usable_bytes",
            "headroom_bytes", "headroom_pct"}
    assert all(set(r) == keys for r in data["results"])
    r = by_where(data)
    assert set(r) == {("bad.yaml", None), ("fit.yaml", "a100-80g"), ("fit.yaml", "h200"),
                      ("huge.yaml", "a100-80g"), ("huge.yaml", "h200")}
    assert r["bad.yaml", None]["error"] == "model: missing"
    assert r["huge.yaml", "h200"]["verdict"] == "does_not_fit"  # ZeRO-0 states: 16 B x 70.6e9 = 1.1 TB > 140 GiB
    assert data["summary"] == {"plans": 3, "checks": 5, "fits": 2, "does_not_fit": 2, "invalid": 1, "drifted": 0,
                               "warnings": 0, "exit_code": 2}
    assert data["options"]["gpus"] == ["h200"] and data["options"]["drift_pct"] == 5.0


def test_junit_parses_and_counts(tmp_path):
    write(small_plan(), tmp_path / "fit.yaml")
    write(huge_plan(), tmp_path / "huge.yaml")
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    odd = tmp_path / "a&b <c> \"d\" \x1b[31m é.yaml"  # markup, quotes, an escape character, non-ASCII
    write(small_plan(), tmp_path / "odd.yaml").rename(odd)
    res = check(str(tmp_path), "--gpu", "h100-80g", "--format", "junit")
    assert res.exit_code == 2
    root = ET.fromstring(res.stdout)
    cases = root.iter("testcase")
    cases = list(cases)
    # fit, huge and odd on 2 targets each, bad once
    assert len(cases) == 7
    failures = [c for c in cases if c.find("failure") is not None]
    errors = [c for c in cases if c.find("error") is not None]
    assert len(failures) == 2 and len(errors) == 1
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("7", "2", "1")
    assert all("huge.yaml" in c.get("name") for c in failures)
    body = failures[0].find("failure").text
    assert "weights" in body and "total" in body and "usable" in body
    assert errors[0].find("error").get("message") == "expected a mapping at the top level"
    assert any(c.get("file") == str(odd).replace("\x1b", "\\x1b") for c in cases)


def test_github_annotations_escape_paths_and_messages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(huge_plan(), tmp_path / "100%,a:b" / "huge.yaml")
    write(small_plan(), tmp_path / "100%,a:b" / "fit.yaml")
    evil = tmp_path / "evil\n::add-mask::x"  # a newline in a folder name must not start a workflow command
    evil.mkdir()
    write(small_plan(), tmp_path / "tmp.yaml").rename(evil / "p.yaml")
    (tmp_path / "100%,a:b" / "zbad.yaml").write_text("layout: [\n")
    res = check("100%,a:b", "evil\n::add-mask::x", "--format", "github")
    assert res.exit_code == 2
    lines = res.stdout.splitlines()
    commands = [line for line in lines if line.startswith("::")]
    assert [c.split(" ")[0] for c in commands] == ["::error", "::error"]
    huge = commands[0]
    assert huge.startswith("::error file=100%25%2Ca%3Ab/huge.yaml,title=ltune check%3A does not fit on a100-80g::"
                           "100%25,a:b/huge.yaml on a100-80g: does not fit: ")
    assert "%0Aper-GPU memory on a100-80g" in huge and "GiB (-" in huge and "%25)%0A" in huge
    assert commands[1] == ("::error file=100%25%2Ca%3Ab/zbad.yaml,title=ltune check%3A invalid plan::"
                           "100%25,a:b/zbad.yaml: invalid: not valid YAML at line 2")
    assert "fits: evil\\n::add-mask::x/p.yaml on a100-80g: " in res.stdout
    assert not any(line.lstrip().startswith("::add-mask") for line in lines)
    assert lines[-1].startswith("checked 4 plan files (4 checks): 2 fit, 1 do not fit, 1 invalid")


@pytest.mark.parametrize("value, expected", [("true", "github"), ("false", "text"), ("", "text")])
def test_github_format_is_the_default_inside_github_actions(tmp_path, value, expected):
    path = write(huge_plan(), tmp_path / "huge.yaml")
    res = check(str(path), env={"GITHUB_ACTIONS": value})
    assert res.exit_code == 1
    first = res.stdout.splitlines()[0]
    assert first.startswith("::error file=") if expected == "github" else first.startswith("does not fit: ")


def test_bad_format_is_one_line(tmp_path):
    res = check(str(write(small_plan(), tmp_path / "p.yaml")), "--format", "xml")
    assert res.exit_code == 2
    assert "--format must be one of text, json, junit, github (got 'xml')" in res.output


# ---------------------------------------------------------------- drift and warnings


def _with_stored_total(plan, total_bytes: int):
    memory = plan.prediction.memory.model_copy(update={"total_bytes": total_bytes})
    return plan.model_copy(update={"prediction": plan.prediction.model_copy(update={"memory": memory})})


def test_drift_of_a_hand_edited_prediction_warns_not_fails(tmp_path):
    out = tmp_path / "plan.yaml"
    assert runner.invoke(app, ["plan", "-m", "qwen2.5-1.5b", "--ctx", "16384", "-o", str(out)]).exit_code == 0
    plan = load_plan(out)
    today = plan.prediction.memory.total_bytes  # just written: the stored figure is today's
    low = write(_with_stored_total(plan, round(today / 1.10)), tmp_path / "low.yaml")  # today is 10% above it
    high = write(_with_stored_total(plan, round(today / 0.97)), tmp_path / "high.yaml")  # today 3% below it
    code, data = check_json(str(out), str(low), str(high))
    assert code == 0
    r = {Path(x["path"]).name: x for x in data["results"]}
    assert r["plan.yaml"]["drift_pct"] == pytest.approx(0.0, abs=1e-9) and not r["plan.yaml"]["drifted"]
    assert r["low.yaml"]["drift_pct"] == pytest.approx(10.0, abs=1e-6) and r["low.yaml"]["drifted"]
    assert r["high.yaml"]["drift_pct"] == pytest.approx(-3.0, abs=1e-6) and not r["high.yaml"]["drifted"]
    assert r["low.yaml"]["stored_total_bytes"] == round(today / 1.10)
    res = check(str(out), str(low), str(high))
    warnings = [line for line in res.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {low} on a100-80g: memory prediction drifted +10.0%: "
                        f"{round(today / 1.10) / GIB:,.2f} GiB per GPU stored in the plan, {today / GIB:,.2f} GiB "
                        f"today (more than --drift 5%)"]
    assert res.exit_code == 0
    assert check(str(low), "--strict-drift").exit_code == 1
    assert check(str(low), "--drift", "10.5", "--strict-drift").exit_code == 0
    assert check(str(high), "--drift", "2.5", "--strict-drift").exit_code == 1
    gh = check(str(low), "--format", "github").stdout.splitlines()
    assert gh[1].startswith(f"::warning file={str(low).replace(':', '%3A')},title=ltune check%3A drift on a100-80g::")
    assert "drifted +10.0%25" in gh[1]


def test_trust_remote_code_is_a_warning_line(tmp_path):
    from ltune.planner.warnings import trust_remote_code_warning

    trusting = small_plan(model={"trust_remote_code": True, "path": "weights/model"})
    assert trust_remote_code_warning(small_plan()) is None
    warning = trust_remote_code_warning(trusting)
    assert "trust_remote_code" in warning and "'weights/model'" in warning
    path = write(trusting, tmp_path / "trust.yaml")
    res = check(str(path), "--gpu", "h100-80g")
    assert res.exit_code == 0
    assert [line for line in res.stdout.splitlines() if line.startswith("warning:")] == [
        f"warning: {path}: {warning}"]
    quiet = check(str(write(small_plan(), tmp_path / "quiet.yaml")))
    assert "warning:" not in quiet.stdout


def test_check_judges_the_plan_as_launch_does(tmp_path):
    """The own-target figure is the launcher's fit re-check, not a second model."""
    from ltune.launcher.spec import evaluate_fit

    plan = make_plan(arch=load_model("internlm2-7b"), gpu="h100-80g", layout={"num_gpus": 8, "sp_degree": 2},
                     training={"seq_len": 65536, "precision": "bf16"})
    path = write(plan, tmp_path / "p.yaml")
    _, data = check_json(str(path))
    assert data["results"][0]["total_bytes"] == evaluate_fit(plan).memory.total_bytes
    assert data["results"][0]["memory"] == evaluate_fit(plan).memory.model_dump()


# ---------------------------------------------------------------- CI files


ROOT = Path(__file__).resolve().parent.parent


def test_pre_commit_hook_picks_plan_files_only():
    import re

    import yaml

    (hook,) = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert (hook["id"], hook["entry"], hook["language"]) == ("ltune-check", "ltune check", "python")
    files = re.compile(hook["files"])  # pre-commit matches with re.search on the repository path
    plans = ["plan.yaml", "examples/tiny-cpu/plan.yaml", "plans/a.yml", "infra/plans/team/x.yaml",
             "llama-8b.plan.yaml", "configs/train-plan.yml"]
    others = [".pre-commit-config.yaml", ".github/workflows/ci.yml", "config.yaml", "plans/notes.txt",
              "plan.yaml.bak", "explanations/a.yaml"]
    assert [p for p in plans if not files.search(p)] == []
    assert [p for p in others if files.search(p)] == []


def test_example_workflow_runs_check_in_github_format():
    import yaml

    workflow = yaml.safe_load((ROOT / "examples" / "ci" / "ltune-check.yml").read_text())
    steps = workflow["jobs"]["check-plans"]["steps"]
    assert [s.get("uses", "").split("@")[0] for s in steps[:2]] == ["actions/checkout", "actions/setup-python"]
    assert steps[-1]["run"] == "ltune check plans/ --format github"
    assert any(s.get("run", "").startswith("pip install") for s in steps)
