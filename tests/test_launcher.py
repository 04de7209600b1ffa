"""`ltune launch` up to starting the job: commands, run folder, checks (no training started).

Commands are compared as data (argument lists, #SBATCH directives), in the style of
accelerate's tests/test_cli.py. The fit re-check is replaced by a stub so these tests
judge the launcher, not the memory model.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import fake_checkpoint, make_plan
from ltune.cli import app
from ltune.launcher import FitRefused, LaunchError, LaunchOptions, plan_launch, start, write_spec
from ltune.launcher import spec as spec_module
from ltune.launcher.command import read_hostfile
from ltune.launcher.slurm import parse_sbatch
from ltune.planner.io import dump_plan, load_plan
from ltune.planner.schema import Evaluation, MemoryBreakdown, Throughput
from ltune.profiles import GIB, load_model
from ltune.job.ds_config import build_ds_config

PY = "python-under-test"  # the interpreter path is a parameter: compare argv exactly


def fake_evaluation(plan, total_gib: float, usable_gib: float = 70.0) -> Evaluation:
    return Evaluation(
        layout=plan.layout,
        memory=MemoryBreakdown(
            terms={"weights": int(total_gib * GIB * 0.25), "activations": int(total_gib * GIB * 0.75)},
            total_bytes=int(total_gib * GIB),
            capacity_bytes=int(80 * GIB),
            usable_bytes=int(usable_gib * GIB),
        ),
        throughput=Throughput(
            step_time_s=1.0, tokens_per_s_per_gpu=1000.0, mfu=0.4, compute_s=0.9, exposed_comm_s=0.1,
            flops_per_token=1e9,
        ),
    )


@pytest.fixture(autouse=True)
def fits(monkeypatch):
    """The fit re-check says 'fits' unless a test says otherwise."""
    monkeypatch.setattr(spec_module, "evaluate_fit", lambda plan: fake_evaluation(plan, 10.0))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A plan folder with two JSONL files and a (presence-only) tokenizer folder; cwd there."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    (tmp_path / "data" / "b.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}, '
                                               '{"role": "assistant", "content": "a"}]}\n')
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cpu_plan(**training):
    fields = {"data": ["data/a.jsonl", "data/b.jsonl"], "output_dir": "runs/tiny"}
    fields.update(training)
    return make_plan(training=fields, model={"tokenizer": "tok"})


def big_plan(num_gpus: int, **hardware):
    """llama2-7b at 32k on h100-80g (8 GPUs per node); ``hardware`` overrides that section."""
    arch = load_model("llama2-7b")
    plan = make_plan(
        arch=arch,
        gpu="h100-80g",
        layout={"num_gpus": num_gpus, "zero_stage": 3, "sp_degree": 4},
        training={"seq_len": 32768, "max_steps": 100, "data": ["data/a.jsonl"], "output_dir": "runs/big"},
        model={"tokenizer": "tok"},
    )
    return plan.model_copy(update={"hardware": plan.hardware.model_copy(update=hardware)})


# llama2-7b's parameters (its config.json: 32 layers, hidden 4096, ffn 11008, vocab 32000, untied):
# 2 x 32000 x 4096 embeddings + 32 x (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096) + 4096 final norm
LLAMA2_7B_PARAMS = 2 * 32000 * 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096
SLOW_STORAGE = 1e8  # 0.1 GB/s per node: a save long enough to move every stop time off its floor


def zero3_node_save_s(num_gpus: int, bandwidth: float) -> float:
    """ZeRO-3 bf16: each rank writes 12 bytes (fp32 master + 2 moments) per parameter of its 1/N share;
    8 ranks per h100-80g node."""
    return 8 * 12 * -(-LLAMA2_7B_PARAMS // num_gpus) / bandwidth


def plan_file(workdir: Path, plan, name: str = "plan.yaml") -> Path:
    path = workdir / name
    dump_plan(plan, path)
    return path


# ---------------------------------------------------------------- commands as data


def test_deepspeed_single_node_argv(workdir):
    spec = plan_launch(cpu_plan(), workdir / "plan.yaml", LaunchOptions(master_port=29611), python=PY,
                       cpu_count=2, environ={})
    run = str(workdir / "runs" / "tiny")
    assert list(spec.argv) == [
        PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29611",
        "--no_local_rank", "--module", "ltune.trainer", run,
    ]
    assert spec.env == {"PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    assert (spec.nodes.nnodes, spec.nodes.nproc_per_node) == (1, 2)


def test_cpu_env_keeps_the_users_thread_count(workdir):
    spec = plan_launch(cpu_plan(), workdir / "plan.yaml", LaunchOptions(master_port=29611), python=PY,
                       cpu_count=16, environ={"OMP_NUM_THREADS": "3"})
    assert "OMP_NUM_THREADS" not in spec.env  # inherited from the user's environment
    spec = plan_launch(cpu_plan(), workdir / "plan.yaml", LaunchOptions(master_port=29611), python=PY,
                       cpu_count=16, environ={})
    assert spec.env["OMP_NUM_THREADS"] == "8"  # 16 cores over 2 ranks


def test_deepspeed_hostfile_two_nodes_argv(workdir):
    (workdir / "hosts").write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    spec = plan_launch(big_plan(16), workdir / "plan.yaml",
                       LaunchOptions(hostfile="hosts", master_addr="10.0.0.1"), python=PY,
                       cpu_count=96, environ={"HOME": str(workdir)})
    run = workdir / "runs" / "big"
    assert list(spec.argv) == [
        PY, "-m", "deepspeed.launcher.runner",
        "--hostfile", str(workdir / "hosts"), "--num_nodes", "2", "--num_gpus", "8",
        "--master_addr", "10.0.0.1", "--master_port", "29500",
        "--no_local_rank", "--module", "ltune.trainer", str(run),
    ]
    # a GPU target: no CPU accelerator; 96 cores over 8 ranks; the env file for the other nodes
    assert spec.env == {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "12", "DS_ENV_FILE": str(run / "deepspeed.env")}
    assert spec.files["deepspeed.env"] == "PYTHONUNBUFFERED=1\nOMP_NUM_THREADS=12\n"


def test_deepspeed_no_ssh_node_rank_argv(workdir):
    """Each node started by hand with the deepspeed launcher: hostfile, --node-rank, --master-addr."""
    (workdir / "hosts").write_text("node-a slots=8\nnode-b slots=8\n")
    spec = plan_launch(big_plan(16), workdir / "plan.yaml",
                       LaunchOptions(hostfile="hosts", node_rank=1, master_addr="node-a"), python=PY)
    assert list(spec.argv) == [
        PY, "-m", "deepspeed.launcher.runner",
        "--hostfile", str(workdir / "hosts"), "--num_nodes", "2", "--num_gpus", "8",
        "--no_ssh", "--node_rank", "1", "--master_addr", "node-a", "--master_port", "29500",
        "--no_local_rank", "--module", "ltune.trainer", str(workdir / "runs" / "big"),
    ]


def test_deepspeed_keeps_the_chosen_gpus(workdir):
    """DeepSpeed's runner drops CUDA_VISIBLE_DEVICES when given --num_gpus: pass the ids on."""
    spec = plan_launch(big_plan(4), workdir / "plan.yaml", LaunchOptions(master_port=29611), python=PY,
                       environ={"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert list(spec.argv[3:5]) == ["--include", "localhost:4,5,6,7"]
    assert "--num_gpus" not in spec.argv
    with pytest.raises(LaunchError, match=r"lists 2 devices; the plan needs 4"):
        plan_launch(big_plan(4), workdir / "plan.yaml", LaunchOptions(master_port=29611), python=PY,
                    environ={"CUDA_VISIBLE_DEVICES": "0,1"})


def test_deepspeed_several_nodes_needs_a_hostfile(workdir):
    with pytest.raises(LaunchError, match="needs --hostfile for 2 nodes"):
        plan_launch(big_plan(16), workdir / "plan.yaml", LaunchOptions(), python=PY)


def test_torchrun_multi_node_argv(workdir):
    """The README's torchrun example: --launcher torchrun --nnodes 2 --node-rank R --master-addr A."""
    opts = LaunchOptions(launcher="torchrun", nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29600)
    spec = plan_launch(big_plan(16), workdir / "plan.yaml", opts, python=PY, cpu_count=64, environ={})
    assert list(spec.argv) == [
        PY, "-m", "torch.distributed.run",
        "--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1",
        "--master-addr", "10.0.0.1", "--master-port", "29600",
        # the step (1 s, the stub's) and a 20.2 s save need 2 x 21.2 s: below ltune's 60 s floor
        "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "60",
        "-m", "ltune.trainer", str(workdir / "runs" / "big"),
    ]
    # torchrun would set OMP_NUM_THREADS=1 for its 8 workers: the node's 64 cores / 8 instead
    assert spec.env == {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "8"}
    assert spec.grace_s == 60 and spec.warnings == ()


def test_stop_grace_follows_the_predicted_save_time(workdir):
    """At 0.1 GB/s a node's ZeRO-3 share of llama2-7b (8 x 12 bytes x P/16) takes 404 s to save;
    torchrun and ltune wait 2 x (1 s step + 404 s save), rounded up."""
    save_s = zero3_node_save_s(16, SLOW_STORAGE)
    assert save_s == pytest.approx(404.3, abs=0.1)
    opts = LaunchOptions(launcher="torchrun", nnodes=2, node_rank=0, master_addr="10.0.0.1", master_port=29600)
    spec = plan_launch(big_plan(16, storage_write_bytes_per_s=SLOW_STORAGE), workdir / "plan.yaml", opts,
                       python=PY, environ={})
    grace = math.ceil(2 * (1.0 + save_s))
    assert grace == 811
    assert spec.argv[spec.argv.index("--shutdown-timeout") + 1] == str(grace)
    assert spec.grace_s == grace and spec.warnings == ()
    ckpt = spec.plan.prediction.checkpoint  # the run folder's plan carries the policy the job uses
    assert ckpt.save_time_s == pytest.approx(save_s) and ckpt.total_bytes == 12 * LLAMA2_7B_PARAMS


def test_deepspeed_launcher_warns_when_a_stop_cannot_save(workdir):
    """DeepSpeed's launch.py kills the ranks 30 s after SIGTERM: a 1 s step + 20.2 s save fits, 404 s does not."""
    (workdir / "hosts").write_text("node-a slots=8\nnode-b slots=8\n")
    quick = plan_launch(big_plan(16), workdir / "plan.yaml", LaunchOptions(hostfile="hosts", master_addr="a"),
                        python=PY, environ={})
    assert quick.warnings == ()
    slow = plan_launch(big_plan(16, storage_write_bytes_per_s=SLOW_STORAGE), workdir / "plan.yaml",
                       LaunchOptions(hostfile="hosts", master_addr="a"), python=PY, environ={})
    assert len(slow.warnings) == 1
    assert "gives the ranks 30 s" in slow.warnings[0] and "~405 s" in slow.warnings[0]


def test_cli_prints_the_stop_warning(workdir):
    dump_plan(big_plan(16, storage_write_bytes_per_s=SLOW_STORAGE), workdir / "plan.yaml")
    (workdir / "hosts").write_text("node-a slots=8\nnode-b slots=8\n")
    result = CliRunner().invoke(app, ["launch", "plan.yaml", "--hostfile", "hosts", "--master-addr", "a", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "warning: a stop (SIGTERM, Ctrl-C) gives the ranks 30 s" in " ".join(result.output.split())


@pytest.mark.parametrize(
    "opts, message",
    [
        (dict(nnodes=2, node_rank=0), "needs --master-addr"),
        (dict(nnodes=2, master_addr="10.0.0.1"), "needs --node-rank"),
        (dict(nnodes=2, node_rank=2, master_addr="10.0.0.1"), r"--node-rank \(2\) must be in 0..1"),
        (dict(nnodes=3), r"num_gpus \(16\) does not split evenly over 3 nodes"),
        (dict(nnodes=1), r"16 processes per node exceed gpus_per_node \(8\)"),
    ],
)
def test_torchrun_multi_node_mistakes(workdir, opts, message):
    with pytest.raises(LaunchError, match=message) as err:
        plan_launch(big_plan(16), workdir / "plan.yaml", LaunchOptions(launcher="torchrun", **opts), python=PY)
    assert err.value.exit_code == 2


def test_sbatch_for_four_nodes(workdir):
    """llama2-7b on 32 h100-80g: 4 nodes x 8 GPUs, one srun task per node running torchrun."""
    spec = plan_launch(big_plan(32), workdir / "plan.yaml", LaunchOptions(launcher="slurm"), python=PY,
                       environ={"OMP_NUM_THREADS": "1"})
    run = workdir / "runs" / "big"
    directives, srun = parse_sbatch(spec.sbatch)
    assert directives == {
        "job-name": "ltune-llama2-7b",
        "nodes": "4",
        "ntasks-per-node": "1",
        "cpus-per-task": "64",  # 8 cores per GPU process (hardware.cpus_per_node unset)
        "mem": "0",  # all of each node's memory
        "gpus-per-node": "8",
        "signal": "USR1@120",  # 2 x (1 s step + 10.1 s save) is below the 120 s floor
        "output": str(run / "slurm-%j.out"),
    }
    assert srun == [
        "srun", "--kill-on-bad-exit=1", "--cpus-per-task=64", PY, "-m", "torch.distributed.run",
        "--nproc-per-node", "8", "--nnodes", "4",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "$MASTER_ADDR:29500", "--rdzv-id", "$SLURM_JOB_ID",
        "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "60",
        "-m", "ltune.trainer", str(run),
    ]
    # the submitting shell's OMP_NUM_THREADS says nothing about the nodes: 64 cores / 8 ranks
    assert "export OMP_NUM_THREADS=8" in spec.sbatch.splitlines()
    lines = spec.sbatch.splitlines()
    assert lines[0] == "#!/bin/bash"
    # the rendezvous host is the allocation's first node, resolved before srun
    addr = next(i for i, line in enumerate(lines) if line.startswith("MASTER_ADDR="))
    assert "scontrol show hostnames" in lines[addr] and addr < lines.index(next(x for x in lines if x.startswith("srun")))
    assert f"export PYTHONUNBUFFERED=1" in lines
    assert list(spec.argv) == ["sbatch", str(run / "launch.sbatch")]
    assert spec.files["launch.sbatch"] == spec.sbatch


def test_sbatch_signal_and_cores_follow_the_plan(workdir):
    """At 0.1 GB/s the save of 4 nodes' ZeRO-3 shares takes 202 s: SIGUSR1 2 x (1 + 202) s before the
    end, torchrun waits as long; hardware.cpus_per_node sets the task's cores and the threads per rank."""
    save_s = zero3_node_save_s(32, SLOW_STORAGE)
    assert save_s == pytest.approx(202.15, abs=0.01)
    lead = math.ceil(2 * (1.0 + save_s))
    assert lead == 407
    plan = big_plan(32, storage_write_bytes_per_s=SLOW_STORAGE, cpus_per_node=112)
    spec = plan_launch(plan, workdir / "plan.yaml", LaunchOptions(launcher="slurm"), python=PY)
    directives, srun = parse_sbatch(spec.sbatch)
    assert directives["signal"] == f"USR1@{lead}" and directives["cpus-per-task"] == "112"
    assert "--cpus-per-task=112" in srun and srun[srun.index("--shutdown-timeout") + 1] == str(lead)
    assert "export OMP_NUM_THREADS=14" in spec.sbatch.splitlines()


# ---------------------------------------------------------------- the run folder


def test_run_folder_holds_resolved_plan_ds_config_and_command(workdir):
    path = plan_file(workdir, cpu_plan())
    spec = plan_launch(load_plan(path), path, LaunchOptions(master_port=29611), python=PY)
    write_spec(spec)
    run = workdir / "runs" / "tiny"
    assert sorted(p.name for p in run.iterdir()) == ["command.json", "ds_config.json", "plan.yaml"]
    stored = load_plan(run / "plan.yaml")
    assert stored.training.data == [str(workdir / "data" / "a.jsonl"), str(workdir / "data" / "b.jsonl")]
    assert stored.model.tokenizer == str(workdir / "tok")
    assert stored.training.output_dir == str(run)
    assert json.loads((run / "ds_config.json").read_text()) == build_ds_config(stored)
    assert json.loads((run / "command.json").read_text()) == {
        "argv": list(spec.argv), "env": spec.env, "cwd": str(workdir),
    }
    # nothing else left beside the run folder (the temporary folder was renamed)
    assert [p.name for p in (workdir / "runs").iterdir()] == ["tiny"]
    assert run.stat().st_mode & 0o777 == (workdir / "runs").stat().st_mode & 0o777  # not mkdtemp's 0700


def test_paths_resolve_against_the_plan_folder_not_cwd(workdir, monkeypatch):
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = plan_file(workdir, cpu_plan())
    spec = plan_launch(load_plan(path), path, LaunchOptions(master_port=29611, run_dir="r"), python=PY)
    assert spec.plan.training.data[0] == str(workdir / "data" / "a.jsonl")
    assert spec.run_dir == elsewhere / "r"  # the run folder is relative to where ltune runs


def test_failed_write_leaves_nothing(workdir, monkeypatch):
    spec = plan_launch(cpu_plan(), workdir / "plan.yaml", LaunchOptions(master_port=29611), python=PY)
    real_write = Path.write_text
    calls = []

    def flaky(self, text, *a, **k):
        calls.append(self.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", flaky)
    with pytest.raises(OSError):
        write_spec(spec)
    assert list((workdir / "runs").iterdir()) == []


def test_existing_run_is_not_overwritten(workdir):
    run = workdir / "runs" / "tiny"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    with pytest.raises(LaunchError, match="--resume"):
        plan_launch(cpu_plan(), workdir / "plan.yaml", LaunchOptions(master_port=29611))
    (workdir / "other").mkdir()
    (workdir / "other" / "notes.txt").write_text("mine")
    with pytest.raises(LaunchError, match="not empty"):
        plan_launch(cpu_plan(), workdir / "plan.yaml", LaunchOptions(master_port=29611, run_dir="other"))
    assert (workdir / "other" / "notes.txt").read_text() == "mine"


def test_a_launch_that_never_ran_is_replaced(workdir):
    first = plan_launch(cpu_plan(), workdir / "plan.yaml", LaunchOptions(master_port=29611))
    write_spec(first)
    second = plan_launch(cpu_plan(max_steps=9), workdir / "plan.yaml", LaunchOptions(master_port=29612))
    write_spec(second)
    assert load_plan(workdir / "runs" / "tiny" / "plan.yaml").training.max_steps == 9
    assert [p.name for p in (workdir / "runs").iterdir()] == ["tiny"]


def test_resume(workdir):
    path = plan_file(workdir, cpu_plan())
    with pytest.raises(LaunchError, match="does not exist"):
        plan_launch(load_plan(path), path, LaunchOptions(resume=True, master_port=29611))
    write_spec(plan_launch(load_plan(path), path, LaunchOptions(master_port=29611)))
    with pytest.raises(LaunchError, match="no checkpoint"):
        plan_launch(load_plan(path), path, LaunchOptions(resume=True, master_port=29611))
    run = workdir / "runs" / "tiny"
    fake_checkpoint(run, 2, world_size=2)  # cpu_plan: 2 processes
    before = {p.name: p.read_text() for p in run.iterdir() if p.is_file()}
    spec = plan_launch(load_plan(path), path, LaunchOptions(resume=True, master_port=29611), python=PY)
    assert spec.argv[-2:] == (str(run), "--resume")
    assert spec.files == {}
    write_spec(spec)
    assert {p.name: p.read_text() for p in run.iterdir() if p.is_file()} == before
    # a different job cannot resume this run
    changed = plan_file(workdir, cpu_plan(learning_rate=1e-3), "changed.yaml")
    with pytest.raises(LaunchError, match="training.learning_rate"):
        plan_launch(load_plan(changed), changed, LaunchOptions(resume=True, master_port=29611))


# ---------------------------------------------------------------- fit re-check


def test_plan_that_does_not_fit_is_refused(workdir, monkeypatch):
    refused = fake_evaluation(big_plan(32), 75.5, usable_gib=70.0)
    monkeypatch.setattr(spec_module, "evaluate_fit", lambda plan: refused)
    with pytest.raises(FitRefused) as err:
        plan_launch(big_plan(32), workdir / "plan.yaml", LaunchOptions(launcher="slurm"))
    assert err.value.exit_code == 1
    assert "75.50 GiB per GPU" in str(err.value) and "short by 5.50 GiB" in str(err.value)
    assert err.value.evaluation is refused  # what the CLI's breakdown table shows
    spec = plan_launch(big_plan(32), workdir / "plan.yaml", LaunchOptions(launcher="slurm", force=True))
    assert spec.forced


def test_real_refusal_carries_the_planners_activations(workdir, monkeypatch):
    """llama2-7b at 256k tokens, sp 2 on 8 H100s: refused by the planner itself (no stub).

    Each rank holds 262144 / 2 = 131072 tokens (t). Its activation terms, by hand
    (h 4096, 32 layers, head_dim 128, vocab 32000, bf16):
    - checkpoints: every layer's input, 2 B x h x t per layer (Korthikanti et al. 2022:
      2sbh with full recompute): 32 x 2 x 4096 x 131072 = 34_359_738_368;
      the final RMSNorm's fp32 upcast, its bf16 normalised input and its bf16 output (saved by
      the output layer), (4 + 2 + 2) x h x t = 4_294_967_296;
      RoPE cos and sin, 2 x 2 B x head_dim x t = 67_108_864: 38_721_814_528 in all;
    - logits and loss: 3 fp32 values per logit in the loss backward, 3 x 4 x 32000 x t
      = 50_331_648_000.
    """
    monkeypatch.undo()
    monkeypatch.chdir(workdir)
    plan = make_plan(
        arch=load_model("llama2-7b"),
        gpu="h100-80g",
        layout={"num_gpus": 8, "zero_stage": 3, "sp_degree": 2},
        training={"seq_len": 262144, "max_steps": 100, "data": ["data/a.jsonl"], "output_dir": "runs/big"},
        model={"tokenizer": "tok"},
    )
    with pytest.raises(FitRefused) as err:
        plan_launch(plan, workdir / "plan.yaml", LaunchOptions(launcher="slurm"))
    terms = err.value.evaluation.memory.terms
    assert terms["activations_checkpoints"] == 38_721_814_528
    assert terms["logits_loss"] == 50_331_648_000


def test_real_fit_check_runs_on_the_plan(workdir, monkeypatch):
    """The planner's check_fit is what the launcher calls (no stub)."""
    monkeypatch.undo()
    monkeypatch.chdir(workdir)
    ev = spec_module.evaluate_fit(cpu_plan())
    assert ev is not None and ev.memory.total_bytes > 0


# ---------------------------------------------------------------- bad input


def test_port_in_use_is_refused(workdir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LaunchError, match=f"master port {port} is in use"):
            plan_launch(cpu_plan(), workdir / "plan.yaml", LaunchOptions(master_port=port))
        # a dry run starts nothing, so it does not test-bind the port
        plan_launch(cpu_plan(), workdir / "plan.yaml", LaunchOptions(master_port=port, dry_run=True))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: (d / "data" / "a.jsonl").unlink(), "a.jsonl: data file not found"),
        (lambda d: (d / "data" / "a.jsonl").write_text(""), "a.jsonl: data file is empty"),
        (lambda d: (d / "data" / "a.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n'), r"a.jsonl:2: malformed JSON"),
        (lambda d: (d / "data" / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'), r"a.jsonl:2: not UTF-8 text"),
        (lambda d: (d / "tok" / "tokenizer.json").unlink(), "holds no tokenizer"),
        (lambda d: (d / "data" / "b.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}]}\n'),
         r"b.jsonl:1: chat record has no assistant turn"),
    ],
)
def test_bad_data_is_a_one_line_error(workdir, setup, message):
    setup(workdir)
    with pytest.raises(LaunchError, match=message) as err:
        plan_launch(cpu_plan(), workdir / "plan.yaml", LaunchOptions(master_port=29611))
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    assert not (workdir / "runs").exists()


def test_hostfile_mistakes(workdir):
    with pytest.raises(LaunchError, match="no such file"):
        plan_launch(big_plan(16), workdir / "plan.yaml", LaunchOptions(hostfile="missing"))
    (workdir / "hosts").write_text("node-a slots=8\n")
    with pytest.raises(LaunchError, match="lists 1 hosts; the plan needs 2 nodes"):
        plan_launch(big_plan(16), workdir / "plan.yaml", LaunchOptions(hostfile="hosts"))
    (workdir / "hosts").write_text("node-a slots=8\nnode-b gpus=8\n")
    with pytest.raises(LaunchError, match=r"hosts:2: expected 'HOST slots=N'"):
        read_hostfile(workdir / "hosts")


# ---------------------------------------------------------------- the CLI

runner = CliRunner()


def test_cli_dry_run_prints_and_writes_nothing(workdir):
    path = plan_file(workdir, cpu_plan())
    result = runner.invoke(app, ["launch", str(path), "--dry-run", "--master-port", "29611"])
    assert result.exit_code == 0, result.output
    assert "deepspeed.launcher.runner --num_gpus 2 --master_port 29611" in result.output
    assert '"zero_optimization"' in result.output
    assert not (workdir / "runs").exists()
    assert sorted(p.name for p in workdir.iterdir()) == ["data", "plan.yaml", "tok"]


def test_cli_slurm_writes_the_script_and_starts_nothing(workdir):
    path = plan_file(workdir, big_plan(32))
    result = runner.invoke(app, ["launch", str(path), "--launcher", "slurm"])
    assert result.exit_code == 0, result.output
    script = workdir / "runs" / "big" / "launch.sbatch"
    assert "submit with: sbatch" in result.output
    assert parse_sbatch(script.read_text())[0]["nodes"] == "4"


def test_cli_refuses_a_plan_that_does_not_fit(workdir, monkeypatch):
    monkeypatch.setattr(spec_module, "evaluate_fit", lambda plan: fake_evaluation(plan, 75.5, usable_gib=70.0))
    path = plan_file(workdir, big_plan(32))
    result = runner.invoke(app, ["launch", str(path), "--launcher", "slurm"])
    assert result.exit_code == 1
    assert "short by 5.50 GiB" in result.output and "activations" in result.output
    assert not (workdir / "runs").exists()
    result = runner.invoke(app, ["launch", str(path), "--launcher", "slurm", "--force"])
    assert result.exit_code == 0, result.output
    assert (workdir / "runs" / "big" / "launch.sbatch").is_file()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read"),
        ("model: [unclosed\n", "not valid YAML"),
        ("schema_version: 2\n", "schema_version 2 is not supported"),
        ("schema_version: 1\nhardware: {gpu: cpu}\n", "missing"),
    ],
)
def test_cli_bad_plan_exits_2(workdir, content, message):
    path = workdir / "bad.yaml"
    if content is not None:
        path.write_text(content)
    result = runner.invoke(app, ["launch", str(path)])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_unknown_launcher_exits_2(workdir):
    path = plan_file(workdir, cpu_plan())
    result = runner.invoke(app, ["launch", str(path), "--launcher", "mpirun"])
    assert result.exit_code == 2 and "--launcher must be one of deepspeed, torchrun, slurm" in result.output


# ---------------------------------------------------------------- start (trivial children, no training)


def test_start_returns_the_childs_exit_code(workdir):
    spec = plan_launch(cpu_plan(), workdir / "plan.yaml", LaunchOptions(master_port=29611))
    spec = replace(spec, argv=(sys.executable, "-c", "import os, sys; sys.exit(int(os.environ['DS_ACCELERATOR'] == 'cpu') + 6)"))
    assert start(spec) == 7  # the child saw the spec's environment, and its code came back


def test_sigterm_is_forwarded_to_the_job(workdir, tmp_path):
    marker = tmp_path / "ready"
    child = (
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
        f"pathlib.Path({str(marker)!r}).write_text('x')\n"
        "time.sleep(30)\n"
        "sys.exit(1)\n"
    )
    spec = plan_launch(cpu_plan(), workdir / "plan.yaml", LaunchOptions(master_port=29611))
    spec = replace(spec, argv=(sys.executable, "-c", child))
    previous = signal.signal(signal.SIGALRM, lambda *a: None)

    def send_term_when_ready(*_):
        if marker.exists():
            signal.raise_signal(signal.SIGTERM)  # as if ltune itself were terminated
        else:
            signal.setitimer(signal.ITIMER_REAL, 0.05)

    signal.signal(signal.SIGALRM, send_term_when_ready)
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    t0 = time.monotonic()
    try:
        code = start(spec)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert code == 42 and time.monotonic() - t0 < 20


def test_sigusr1_is_forwarded_and_the_wait_is_the_plans_grace(workdir, tmp_path, monkeypatch):
    """Slurm's pre-timeout SIGUSR1 reaches the job like SIGTERM; after the launcher process exits,
    ltune waits spec.grace_s for the rest of the group (not a fixed 60 s)."""
    from ltune.launcher import process

    waited = []
    monkeypatch.setattr(process, "wait_for_group", lambda pgid, grace_s: waited.append(grace_s))
    marker = tmp_path / "ready"
    child = (
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(43))\n"
        f"pathlib.Path({str(marker)!r}).write_text('x')\n"
        "time.sleep(10)\n"
        "sys.exit(1)\n"
    )
    spec = plan_launch(cpu_plan(), workdir / "plan.yaml", LaunchOptions(master_port=29611))
    spec = replace(spec, argv=(sys.executable, "-c", child), grace_s=777)
    previous = signal.signal(signal.SIGALRM, lambda *a: None)
    previous_usr1 = signal.signal(signal.SIGUSR1, lambda *a: None)  # unforwarded, it must not end pytest

    def send_usr1_when_ready(*_):
        if marker.exists():
            signal.raise_signal(signal.SIGUSR1)
        else:
            signal.setitimer(signal.ITIMER_REAL, 0.05)

    signal.signal(signal.SIGALRM, send_usr1_when_ready)
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    try:
        code = start(spec)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        signal.signal(signal.SIGUSR1, previous_usr1)
    assert code == 43 and waited == [777]


def test_start_waits_for_every_process_of_the_job(workdir, tmp_path):
    """DeepSpeed's runner can exit before its ranks: ltune returns only when all are gone."""
    marker = tmp_path / "grandchild-done"
    grandchild = f"import time, pathlib; time.sleep(1); pathlib.Path({str(marker)!r}).write_text('x')"
    child = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); sys.exit(3)"
    spec = plan_launch(cpu_plan(), workdir / "plan.yaml", LaunchOptions(master_port=29611))
    spec = replace(spec, argv=(sys.executable, "-c", child))
    assert start(spec) == 3
    assert marker.exists()


# ---------------------------------------------------------------- resume only a run that ran


def test_resume_needs_a_complete_checkpoint(workdir):
    path = plan_file(workdir, cpu_plan())
    write_spec(plan_launch(load_plan(path), path, LaunchOptions(master_port=29611)))
    run = workdir / "runs" / "tiny"
    resume = LaunchOptions(resume=True, master_port=29611)
    (run / "checkpoints" / "step-2").mkdir(parents=True)  # not a checkpoint's name
    with pytest.raises(LaunchError, match="holds no checkpoint in checkpoints/"):
        plan_launch(load_plan(path), path, resume)
    torn = fake_checkpoint(run, 4, 2)
    (torn / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)  # truncated since the save
    fake_checkpoint(run, 6, 2, marker=False)  # the save was cut short
    with pytest.raises(LaunchError) as err:
        plan_launch(load_plan(path), path, resume)
    assert str(err.value) == (
        f"--resume: run folder {run} holds no complete checkpoint to resume from (newest, step_6: no completion "
        "marker (the save did not finish); 1 older one(s) incomplete too)"
    )
    fake_checkpoint(run, 8, 4)  # complete, but for 4 processes: this plan runs 2
    with pytest.raises(LaunchError, match=r"\(newest, step_8: saved by 4 processes, this job has 2; 2 older"):
        plan_launch(load_plan(path), path, resume)
    fake_checkpoint(run, 2, 2)  # complete and older: the trainer would resume from it
    assert plan_launch(load_plan(path), path, resume, python=PY).argv[-1] == "--resume"


def _failing_spec(workdir, child: str):
    """A real launch's spec whose job is ``python -c child`` (no training)."""
    spec = plan_launch(cpu_plan(), workdir / "plan.yaml", LaunchOptions(master_port=29611))
    return replace(spec, argv=(sys.executable, "-c", child))


def test_a_job_that_fails_before_its_first_step_leaves_no_run_folder(workdir):
    from ltune.launcher.process import launch

    run = workdir / "runs" / "tiny"
    # what a trainer that died early leaves: an empty checkpoints/, a torn metrics.jsonl
    child = (f"import pathlib, sys; run = pathlib.Path({str(run)!r}); (run / 'checkpoints').mkdir(); "
             "(run / 'metrics.jsonl').write_text('{\"step\": 1, \"lo'); sys.exit(2)")
    assert launch(_failing_spec(workdir, child)) == 2
    assert not run.exists() and (workdir / "runs").is_dir()
    # nothing for --resume to mistake for a run; a new launch starts afresh
    assert plan_launch(cpu_plan(), workdir / "plan.yaml", LaunchOptions(master_port=29611)).run_dir == run


@pytest.mark.parametrize("child_writes, kept", [
    ("(run / 'metrics.jsonl').write_text('{\"step\": 1, \"loss\": 5.0}\\n')", None),  # a step was logged
    ("(run / 'notes.txt').write_text('mine')", "notes.txt"),  # not ltune's: never removed
    ("(run / 'checkpoints' / 'step_2').mkdir(parents=True)", "checkpoints"),  # a save began
])
def test_a_run_folder_that_holds_more_than_a_launch_stays(workdir, child_writes, kept):
    from ltune.launcher.process import discard_failed_launch, launch

    run = workdir / "runs" / "tiny"
    spec = _failing_spec(workdir, f"import pathlib, sys; run = pathlib.Path({str(run)!r}); {child_writes}; sys.exit(1)")
    assert launch(spec) == 1
    before = sorted(p.name for p in run.iterdir())
    assert {"plan.yaml", "ds_config.json", "command.json"} <= set(before)
    found = discard_failed_launch(spec, 1)
    assert (found is None) if kept is None else (found.other == (kept,))
    assert sorted(p.name for p in run.iterdir()) == before


def test_only_a_failed_new_local_run_is_discarded(workdir):
    from ltune.launcher.process import discard_failed_launch

    spec = _failing_spec(workdir, "pass")
    for case in (replace(spec, resume=True), replace(spec, launcher="slurm"),
                 replace(spec, nodes=replace(spec.nodes, nnodes=2))):
        write_spec(spec)
        assert discard_failed_launch(case, 2) is None and spec.run_dir.is_dir()
    assert discard_failed_launch(spec, 0) is None and spec.run_dir.is_dir()  # the job succeeded
    fake_checkpoint(spec.run_dir, 2, 2)  # a complete checkpoint and no metrics: it ran
    assert discard_failed_launch(spec, 137) is None and spec.run_dir.is_dir()


def test_cli_says_it_removed_the_run_folder(workdir, capsys):
    from ltune import cli

    run = workdir / "runs" / "tiny"
    assert cli._write_and_start(_failing_spec(workdir, "import sys; sys.exit(2)"), submit=False) == 2
    err = capsys.readouterr().err
    assert not run.exists()
    assert f"removed run folder {run}: the job stopped before its first step (removed command.json, ds_config.json, plan.yaml)" in " ".join(err.split())


# ---------------------------------------------------------------- the environment of other nodes


def test_deepspeed_env_file_carries_the_jobs_variables(workdir):
    """deepspeed.env: the job's variables of this environment, ltune's own, then the user's
    ~/.deepspeed_env lines; a value the runner's quoting would let the remote shell read is left out."""
    home = workdir / "home"
    home.mkdir()
    (home / ".deepspeed_env").write_text("NCCL_SOCKET_IFNAME=ib0\n\nLTUNE_CACHE_DIR=/shared/override\n")
    (workdir / "hosts").write_text("node-a slots=8\nnode-b slots=8\n")
    environ = {
        "HOME": str(home), "LTUNE_CACHE_DIR": "/shared/cache", "HF_HOME": "/shared/hf",
        "TORCH_EXTENSIONS_DIR": "/shared/ext", "PYTHONPATH": "/src", "PATH": "/venv/bin:/usr/bin",
        "CUDA_VISIBLE_DEVICES": "0,1", "EDITOR": "vim", "HF_TOKEN": "a$(id)b", "OMP_NUM_THREADS": "6",
    }
    spec = plan_launch(big_plan(16), workdir / "plan.yaml", LaunchOptions(hostfile="hosts", master_addr="a"),
                       python=PY, environ=environ)
    assert spec.env["DS_ENV_FILE"] == str(workdir / "runs" / "big" / "deepspeed.env")
    assert spec.files["deepspeed.env"].splitlines() == [
        "HF_HOME=/shared/hf",
        "LTUNE_CACHE_DIR=/shared/override",  # the user's file wins
        "OMP_NUM_THREADS=6",  # set by the user: kept (not in spec.env)
        "PATH=/venv/bin:/usr/bin",
        "PYTHONPATH=/src",
        "TORCH_EXTENSIONS_DIR=/shared/ext",
        "PYTHONUNBUFFERED=1",
        "NCCL_SOCKET_IFNAME=ib0",
    ]
    assert spec.warnings == ("HF_TOKEN: not carried to the other nodes (deepspeed.env: a value with quotes, $, "
                             "backquotes, backslashes, control characters or edge spaces)",)
    write_spec(spec)
    assert (spec.run_dir / "deepspeed.env").read_text() == spec.files["deepspeed.env"]


def test_deepspeeds_runner_exports_the_env_file(workdir, tmp_path):
    """DeepSpeed's own runner code, given DS_ENV_FILE as the launch sets it, reads deepspeed.env and
    builds pdsh's remote exports; bash running those exports sees every value unchanged."""
    import os
    import subprocess

    (workdir / "hosts").write_text("node-a slots=8\nnode-b slots=8\n")
    environ = {"HOME": str(tmp_path), "LTUNE_CACHE_DIR": "/shared/a b", "HF_HOME": "/shared/hf,x@y%z+1",
               "PATH": os.environ["PATH"]}
    spec = plan_launch(big_plan(16), workdir / "plan.yaml", LaunchOptions(hostfile="hosts", master_addr="a"),
                       python=PY, environ=environ, cpu_count=16)
    write_spec(spec)
    # runner.py main(): the env-file loop and PDSHRunner.get_cmd's export string, run against our file
    probe = (
        "import os, sys\n"
        "from deepspeed.launcher import runner\n"
        "from deepspeed.launcher.multinode_runner import PDSHRunner\n"
        "class A: user_args = []; user_script = 'x'\n"
        "r = PDSHRunner(A(), '')\n"
        "for p in runner.DEEPSPEED_ENVIRONMENT_PATHS:\n"
        "    f = os.path.join(p, runner.DEEPSPEED_ENVIRONMENT_NAME)\n"
        "    if os.path.isfile(f):\n"
        "        for var in open(f).readlines():\n"
        "            key, val = var.split('=', maxsplit=1)\n"
        "            r.add_export(key, val)\n"
        "sys.stdout.write(''.join('export {}={}; '.format(k, v) for k, v in r.exports.items()))\n"
    )
    env = {**os.environ, **spec.env, "DS_ACCELERATOR": "cpu", "HOME": str(tmp_path)}
    exports = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True,
                             text=True, check=True).stdout
    remote = subprocess.run(["bash", "-c", exports + "env -0"], env={}, capture_output=True, check=True).stdout
    seen = dict(item.split("=", 1) for item in remote.decode().split("\0") if "=" in item)
    expected = dict(line.split("=", 1) for line in spec.files["deepspeed.env"].splitlines())
    assert expected["LTUNE_CACHE_DIR"] == "/shared/a b" and expected["OMP_NUM_THREADS"] == "2"  # 16 cores / 8
    assert {k: seen.get(k) for k in expected} == expected
