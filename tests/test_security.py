"""Hostile strings never run: the sbatch script quotes every value it holds.

The generated script is run by bash with stub `srun` and `scontrol` on PATH (no Slurm
needed). Every string that reaches it carries shell metacharacters that would create a
file if any of them were evaluated; after the run no such file exists and `srun` received
the strings literally.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import make_plan
from ltune.launcher import LaunchError, LaunchOptions, plan_launch
from ltune.launcher import spec as spec_module
from ltune.launcher.slurm import SbatchScript, ShellVar, build_sbatch
from ltune.launcher.command import NodeLayout

from test_launcher import fake_evaluation

#: each would create a file named PWNED* in the current folder if a shell evaluated it
PAYLOADS = (
    "$(touch${IFS}PWNED1)",
    "`touch${IFS}PWNED2`",
    ";touch${IFS}PWNED3;",
    "'$(touch${IFS}PWNED4)'",
    "&&touch${IFS}PWNED5||",
    "${IFS}|touch${IFS}PWNED6",
)


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run_script(script: Path, cwd: Path, tmp: Path) -> list[str]:
    """Run the sbatch script as Slurm would (bash), with stubs; srun's argv."""
    stubs = tmp / "stubs"
    stubs.mkdir(exist_ok=True)
    argv_file = tmp / "srun.argv"
    _stub(stubs, "srun", f'printf "%s\\0" "$@" > {argv_file}\n')
    _stub(stubs, "scontrol", 'echo node-a\necho node-b\n')
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-[a-b]")
    proc = subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return argv_file.read_text().split("\0")[:-1]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_sbatch_script_runs_no_payload(tmp_path, monkeypatch, payload):
    """Run folder, output_dir and model name carry the payload; only srun runs."""
    monkeypatch.setattr(spec_module, "evaluate_fit", lambda plan: fake_evaluation(plan, 10.0))
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.jsonl").write_text('{"text": "hi"}\n')
    (work / "tok").mkdir()
    (work / "tok" / "tokenizer.json").write_text("{}")
    monkeypatch.chdir(work)
    plan = make_plan(
        gpu="cpu",
        model={"name": payload, "tokenizer": "tok"},
        training={"data": ["data.jsonl"], "output_dir": f"runs/{payload}"},
    )
    plan = plan.model_copy(update={"model": plan.model.model_copy(update={
        "architecture": plan.model.architecture.model_copy(update={"name": f"tiny{payload}"})})})
    run_dir = work / "runs" / f"r{payload}"
    options = LaunchOptions(launcher="slurm", run_dir=str(run_dir))
    if "'" in payload:  # a quote cannot go into the #SBATCH --output line: refused, nothing written
        with pytest.raises(LaunchError, match="#SBATCH"):
            plan_launch(plan, work / "plan.yaml", options, python="python3")
        options = LaunchOptions(launcher="slurm", run_dir=str(work / "runs" / "r"))
        run_dir = work / "runs" / "r"
    spec = plan_launch(plan, work / "plan.yaml", options, python="python3")
    run_dir.mkdir(parents=True)
    script = run_dir / "launch.sbatch"
    script.write_text(spec.sbatch)
    argv = _run_script(script, work, tmp_path)
    assert not list(work.glob("PWNED*")) and not list(tmp_path.rglob("PWNED*"))
    assert argv[-1] == str(run_dir)  # the trainer's run folder, literally
    assert "node-a:29500" in argv and "4242" in argv  # the two variables the script does expand


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a b", 'a"b', "a\\b", "a\x00b"])
def test_sbatch_refuses_unquotable_directive_values(tmp_path, bad):
    """A newline in an #SBATCH line would start a line bash runs: refused, not written."""
    with pytest.raises(ValueError, match="#SBATCH"):
        build_sbatch(tmp_path / bad, NodeLayout(nnodes=1, nproc_per_node=2), 29500, job_name="ltune")


def test_sbatch_job_name_keeps_only_safe_characters(tmp_path, monkeypatch):
    monkeypatch.setattr(spec_module, "evaluate_fit", lambda plan: fake_evaluation(plan, 10.0))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    plan = make_plan(model={"tokenizer": "tok"}, training={"data": ["d.jsonl"]})
    plan = plan.model_copy(update={"model": plan.model.model_copy(update={
        "architecture": plan.model.architecture.model_copy(update={"name": "tiny\ntouch PWNED"})})})
    spec = plan_launch(plan, tmp_path / "plan.yaml", LaunchOptions(launcher="slurm"))
    assert "#SBATCH --job-name=ltune-tiny_touch_PWNED\n" in spec.sbatch


def test_only_known_variables_expand():
    with pytest.raises(ValueError, match="not a variable"):
        ShellVar("HOME")
    script = SbatchScript(directives=(), srun_argv=("srun", "$HOME", ShellVar("SLURM_JOB_ID")))
    assert script.render().splitlines()[-1] == "srun '$HOME' \"$SLURM_JOB_ID\""
