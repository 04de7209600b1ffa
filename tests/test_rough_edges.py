"""Issue 15, rough edges a new user hits: one test each (CliRunner in-process unless a pipe is needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ltune.cli import CLOSED_PIPE_EXIT, app
from ltune.planner.options import parse_ctx, parse_tokens
from ltune.profiles import GIB, ProfileError, detect_gpu, gpu_names, gpu_profile_for
from ltune.render import trace_pct

runner = CliRunner()
PLAN = ["plan", "-m", "llama2-7b", "--json"]


def _plan_json(*args: str) -> dict:
    result = runner.invoke(app, [*PLAN, *args])
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


# ---------------------------------------------------------------- --ctx 8k


@pytest.mark.parametrize("text, tokens", [("8k", 8192), ("32K", 32768), ("1m", 1048576), ("1M", 1048576),
                                          ("4096", 4096), (" 128k ", 131072)])
def test_token_counts_with_suffixes(text, tokens):
    assert parse_tokens(text) == tokens
    assert parse_ctx(text) == tokens


@pytest.mark.parametrize("text", ["8kb", "k", "1.5k", "-8k", "8g", "eight"])
def test_bad_token_counts_are_one_line_errors(text):
    with pytest.raises(ValueError) as e:
        parse_ctx(text)
    assert "--ctx" in str(e.value) and "\n" not in str(e.value)


def test_plan_and_trace_take_8k():
    assert _plan_json("--ctx", "8k")["seq_len"] == 8 * 1024
    assert _plan_json("--ctx", "max", "--gpus", "8")["longest_context"]["seq_len"] > 0  # --ctx max still works
    # trace reads --ctx before it needs torch: a bad count is the flag's one-line error, a good one is not
    bad = runner.invoke(app, ["trace", "-m", "llama2-7b", "--ctx", "8q"])
    assert bad.exit_code == 2 and "Invalid value for '--ctx'" in bad.stderr, bad.output
    big = runner.invoke(app, ["trace", "-m", "llama2-7b", "--ctx", "1024m"])  # 2**30 > the bound 2**27
    assert big.exit_code == 2 and "--ctx: Input should be less than or equal to" in big.stderr, big.output


# ---------------------------------------------------------------- names: any case, --gpu auto


def test_gpu_and_model_names_in_any_case(tmp_path):
    out = _plan_json("--ctx", "4096", "--gpu", "H100-80G")
    assert out["gpu"] == "h100-80g"
    upper = runner.invoke(app, ["plan", "-m", "LLAMA2-7B", "--ctx", "4096", "--json"])
    assert upper.exit_code == 0 and json.loads(upper.stdout)["fits"], upper.output
    path = tmp_path / "p.yaml"
    assert runner.invoke(app, ["plan", "-m", "llama2-7b", "--ctx", "4096", "-o", str(path)]).exit_code == 0
    data = yaml.safe_load(path.read_text())
    data["hardware"]["gpu"] = data["hardware"]["gpu"].upper()
    path.write_text(yaml.safe_dump(data))
    assert runner.invoke(app, ["check", str(path)]).exit_code == 0


@pytest.mark.parametrize("name, mib, profile", [
    ("NVIDIA H100 80GB HBM3", 81559, "h100-80g"), ("NVIDIA H100 PCIe", 81559, "h100-pcie"),
    ("NVIDIA A100-SXM4-80GB", 81920, "a100-80g"), ("NVIDIA A100-SXM4-40GB", 40960, "a100-40g"),
    ("NVIDIA A100-PCIE-40GB", 40960, "a100-40g"), ("NVIDIA A100 PCIe", 81920, "a100-80g"), ("NVIDIA A100 PCIe", 40960, "a100-40g"),
    ("NVIDIA H200", 143771, "h200"), ("NVIDIA H20", 97871, "h20"), ("NVIDIA A10", 23028, "a10"),
    ("NVIDIA GeForce RTX 4090", 24564, "rtx4090"), ("Tesla V100-SXM2-32GB", 32768, "v100-32g"),
    ("NVIDIA A10G", 23028, None), ("Tesla V100-SXM2-16GB", 16160, None), ("Tesla T4", 15360, None),
])
def test_nvidia_smi_names_map_to_profiles(name, mib, profile):
    assert gpu_profile_for(name, mib) == profile
    assert profile is None or profile in gpu_names()


def _stub_smi(folder: Path, monkeypatch, output: str, code: int = 0) -> None:
    """nvidia-smi on PATH that prints `output` (what --query-gpu=name,memory.total prints)."""
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\nexit {code}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_gpu_auto_reads_nvidia_smi(tmp_path, monkeypatch):
    _stub_smi(tmp_path, monkeypatch, "NVIDIA H100 80GB HBM3, 81559\nNVIDIA H100 80GB HBM3, 81559\n")
    assert detect_gpu() == "h100-80g"
    assert _plan_json("--ctx", "4096", "--gpu", "auto")["gpu"] == "h100-80g"


@pytest.mark.parametrize("output, code, words", [
    ("Tesla T4, 15360\n", 0, "no profile for 'Tesla T4'"),
    ("", 9, "nvidia-smi"),
    ("NVIDIA H200, 143771\nNVIDIA A10, 23028\n", 0, "several GPU kinds"),
])
def test_gpu_auto_errors_are_one_line(tmp_path, monkeypatch, output, code, words):
    _stub_smi(tmp_path, monkeypatch, output, code)
    result = runner.invoke(app, ["plan", "-m", "llama2-7b", "--ctx", "4096", "--gpu", "auto"])
    assert result.exit_code == 2 and words in result.stderr and result.stderr.count("\n") == 1, result.output


def test_gpu_auto_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ProfileError, match="nvidia-smi not found"):
        detect_gpu()


# ---------------------------------------------------------------- ltune gpus


def test_gpus_prints_whole_names_to_a_pipe_and_hides_cpu():
    out = runner.invoke(app, ["gpus"]).stdout  # CliRunner's stdout is not a terminal
    assert "NVIDIA H100 80GB HBM3 (SXM5)" in out and "a100-80g" in out and "…" not in out
    assert "│ cpu " not in out
    assert "│ cpu " in runner.invoke(app, ["gpus", "--all"]).stdout


# ---------------------------------------------------------------- plan's text


def test_offload_plan_shows_host_memory_against_capacity():
    args = ["plan", "-m", "llama2-7b", "--ctx", "32k", "--gpus", "8", "--offload", "optimizer"]
    out = runner.invoke(app, args, env={"COLUMNS": "200"}).stdout
    js = _plan_json("--ctx", "32k", "--gpus", "8", "--offload", "optimizer")["memory"]
    host, cap = js["host_bytes_per_node"], js["host_capacity_bytes_per_node"]
    assert host > 0
    assert f"host memory per node {host / GIB:,.2f} of {cap / GIB:,.2f} GiB" in out, out


def test_conventional_named_as_in_json_and_never_silent():
    out = runner.invoke(app, ["plan", "-m", "llama2-7b", "--ctx", "32k", "--gpus", "8"], env={"COLUMNS": "200"}).stdout
    assert "conventional (ZeRO-3" in out and "constrained" not in out
    assert _plan_json("--ctx", "32k", "--gpus", "8")["conventional"] is not None
    # at 1M tokens on 8 GPUs plain ZeRO-3 (no sp, full sequence per GPU) never fits
    assert _plan_json("--ctx", "1m", "--gpus", "8")["conventional"] is None
    out = runner.invoke(app, ["plan", "-m", "llama2-7b", "--ctx", "1m", "--gpus", "8"], env={"COLUMNS": "200"}).stdout
    assert "conventional (ZeRO-3" in out and "fits at no GPU count searched (8 GPUs)" in out, out


def test_no_recompute_labels_saved_activations():
    args = ["plan", "-m", "llama2-7b", "--ctx", "8k", "--recompute", "none", "--gpus", "8"]
    out = runner.invoke(app, args, env={"COLUMNS": "200"}).stdout
    assert "activations_saved" in out and "activations_checkpoints" not in out, out
    full = runner.invoke(app, [*args[:-3], "full", "--gpus", "8"], env={"COLUMNS": "200"}).stdout
    assert "activations_checkpoints" in full and "activations_saved" not in full


def test_trace_percent_of_zero_terms():
    mib = 2**20
    assert trace_pct(0, 3 * mib) == "—"  # both 0.00 GiB as shown
    assert trace_pct(0, 200 * mib) == "none predicted"  # was -100.0
    assert trace_pct(200 * mib, 0) == "none traced"
    assert trace_pct(110 * mib, 100 * mib) == "+10.0"


# ---------------------------------------------------------------- launch --dry-run, plan -o, pipes


def test_dry_run_of_a_plan_without_tokenizer_or_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = runner.invoke(app, ["plan", "-m", "llama3.2-1b", "--ctx", "4k", "--gpu", "cpu", "-o", "p.yaml",
                               "--data", "missing.jsonl"])
    assert made.exit_code == 0, made.output
    dry = runner.invoke(app, ["launch", "p.yaml", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "ds_config.json" in dry.stdout and "command" in dry.stdout
    assert "missing.jsonl: data file not found (a real launch refuses" in dry.stderr, dry.stderr
    real = runner.invoke(app, ["launch", "p.yaml"])
    assert real.exit_code == 2 and "data file not found" in real.stderr and not (tmp_path / "runs").exists()


def test_output_into_a_missing_folder_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["plan", "-m", "llama2-7b", "--ctx", "4096", "-o", "sub/dir/plan.yaml"])
    assert result.exit_code == 2 and "folder sub/dir does not exist" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("args", [["plan", "-m", "llama2-7b", "--ctx", "4096"],
                                  ["plan", "-m", "llama2-7b", "--ctx", "4096", "--json"]])
def test_plan_into_a_closed_pipe(args):
    """`ltune plan ... | head -1`: exit 141 (128 + SIGPIPE, as `yes | head`), not 1, no traceback.
    The reader here (`true`) is gone before the first write, so the pipe is closed every time;
    head -1 would race with ltune writing all of its output into the pipe's buffer."""
    ltune = [sys.executable, "-m", "ltune", *args]
    cmd = " ".join(ltune) + " 2>err.txt | true; echo ${PIPESTATUS[0]}"
    with_env = {**os.environ, "COLUMNS": "80"}
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        done = subprocess.run(["bash", "-c", cmd], cwd=d, capture_output=True, text=True, env=with_env, timeout=120)
        err = Path(d, "err.txt").read_text()
    assert done.stdout.strip() == str(CLOSED_PIPE_EXIT), (done.stdout, err)
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_pre_ampere_plan_says_sdpa_runs():
    out = runner.invoke(app, ["plan", "-m", "llama2-7b", "--ctx", "8k", "--gpu", "v100-32g"],
                        env={"COLUMNS": "300"}).stdout
    assert "runs scaled_dot_product_attention once per document" in out, out
    a100 = runner.invoke(app, ["plan", "-m", "llama2-7b", "--ctx", "8k"], env={"COLUMNS": "300"}).stdout
    assert "once per document" not in a100
