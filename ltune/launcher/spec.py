"""Planning a launch: plan + options -> LaunchSpec (data only; nothing written or started).

Checks run in this order, each a LaunchError before anything is written: node layout and
hostfile, data, fit (FitRefused, exit 1, unless --force), run folder, master port.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Mapping

from ..planner.schema import Evaluation, Plan
from ..profiles import GIB, ProfileError, load_gpu
from . import rundir
from .command import (
    DEFAULT_MASTER_PORT,
    NodeLayout,
    check_hostfile,
    deepspeed_argv,
    node_layout,
    read_hostfile,
    torchrun_argv,
)
from .data import validate_plan_data
from .errors import FitRefused, LaunchError
from .ports import free_port, port_in_use
from .slurm import build_sbatch

Launcher = Literal["deepspeed", "torchrun", "slurm"]
LAUNCHERS: tuple[str, ...] = ("deepspeed", "torchrun", "slurm")
CPU_TARGET = "cpu"


@dataclass(frozen=True)
class LaunchOptions:
    """What `ltune launch` was asked, besides the plan."""

    launcher: Launcher = "deepspeed"
    hostfile: str | None = None
    nnodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    run_dir: str | None = None
    resume: bool = False
    force: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class LaunchSpec:
    """Everything about one launch, decided: what to write and what to run."""

    launcher: str
    run_dir: Path
    plan: Plan  # as stored in the run folder: paths absolute, output_dir = run_dir
    argv: tuple[str, ...]  # for slurm: the sbatch submission
    env: dict[str, str]  # added to the current environment
    cwd: Path
    ds_config: dict[str, Any]
    nodes: NodeLayout
    master_port: int
    sbatch: str | None = None
    evaluation: Evaluation | None = None  # None when the planner's fit check is unavailable
    forced: bool = False  # the plan does not fit and --force launches it anyway
    resume: bool = False
    files: dict[str, str] = field(default_factory=dict)  # name -> text, written into run_dir

    @property
    def command(self) -> dict[str, Any]:
        """command.json: the exact argv, the environment added, the working folder."""
        return {"argv": list(self.argv), "env": dict(self.env), "cwd": str(self.cwd)}


# ---------------------------------------------------------------- fit


def evaluate_fit(plan: Plan) -> Evaluation | None:
    """The planner's re-check of the plan on its target (None until the planner has it)."""
    try:
        from ..planner.fit import check_fit
    except ImportError:
        return None
    try:
        return check_fit(plan)
    except ValueError as e:  # the planner cannot judge this plan (e.g. an unknown profile)
        raise LaunchError(f"fit re-check: {e}") from None


def shortfall_message(plan: Plan, evaluation: Evaluation) -> str:
    """One line: what does not fit and by how much (GiB)."""
    mem = evaluation.memory
    parts = []
    if not mem.fits_gpu:
        parts.append(
            f"needs {mem.total_bytes / GIB:.2f} GiB per GPU but {plan.hardware.gpu} has "
            f"{mem.usable_bytes / GIB:.2f} GiB usable (short by {(mem.total_bytes - mem.usable_bytes) / GIB:.2f} GiB)"
        )
    if not mem.fits_host:
        parts.append(
            f"needs {mem.host_bytes_per_node / GIB:.2f} GiB host memory per node but has "
            f"{mem.host_capacity_bytes_per_node / GIB:.2f} GiB "
            f"(short by {(mem.host_bytes_per_node - mem.host_capacity_bytes_per_node) / GIB:.2f} GiB)"
        )
    return "the plan no longer fits: " + "; ".join(parts)


# ---------------------------------------------------------------- environment


def job_env(
    plan: Plan,
    nodes: NodeLayout,
    cpu_count: int | None = None,
    environ: Mapping[str, str] | None = None,
    local: bool = True,
) -> dict[str, str]:
    """Variables added to the job's environment.

    PYTHONUNBUFFERED: torchrun's workers would otherwise buffer their output in pipes.
    On the cpu target: DS_ACCELERATOR=cpu (DeepSpeed's CPU accelerator, gloo) and, unless
    set already, OMP_NUM_THREADS = cores / processes so ranks do not oversubscribe cores
    (local launches only: this machine's core count says nothing about Slurm's nodes).
    """
    environ = os.environ if environ is None else environ
    env = {"PYTHONUNBUFFERED": "1"}
    if plan.hardware.gpu == CPU_TARGET:
        env["DS_ACCELERATOR"] = "cpu"
        if local and "OMP_NUM_THREADS" not in environ:
            cores = cpu_count or os.cpu_count() or 1
            env["OMP_NUM_THREADS"] = str(max(1, cores // nodes.nproc_per_node))
    return env


# ---------------------------------------------------------------- the plan of a launch


def plan_launch(
    plan: Plan,
    plan_path: str | Path,
    options: LaunchOptions,
    *,
    cwd: str | Path | None = None,
    python: str | None = None,
    cpu_count: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> LaunchSpec:
    """Decide the launch: run folder, argv, env, ds_config, sbatch text, files to write.

    Reads the file system (data, hostfile, run folder) and test-binds the master port,
    but writes and starts nothing. Raises LaunchError (exit 2) or FitRefused (exit 1).
    """
    if options.launcher not in LAUNCHERS:
        raise LaunchError(f"--launcher must be one of {', '.join(LAUNCHERS)} (got {options.launcher!r})")
    cwd = Path(cwd or os.getcwd()).resolve()
    plan_dir = Path(plan_path).expanduser().resolve().parent
    run_dir = rundir.default_run_dir(plan, options.run_dir, cwd)
    resolved = rundir.resolve_plan(plan, plan_dir, run_dir)
    is_cpu = plan.hardware.gpu == CPU_TARGET

    # nodes and hostfile
    try:
        gpu = load_gpu(plan.hardware.gpu)
    except ProfileError as e:
        raise LaunchError(f"hardware.gpu: {e}") from None
    nodes = node_layout(
        plan.layout.num_gpus,
        plan.hardware.num_nodes,
        gpu.gpus_per_node,
        gpu.name,
        nnodes_override=options.nnodes,
        allow_oversubscribe=is_cpu,
    )
    if options.hostfile is not None:
        if options.launcher != "deepspeed":
            raise LaunchError("--hostfile is read by the deepspeed launcher only (--launcher deepspeed)")
        check_hostfile(read_hostfile(options.hostfile), nodes, options.hostfile)
    hostfile = str(Path(options.hostfile).expanduser().resolve()) if options.hostfile else None
    if options.master_port is not None and not 0 < options.master_port < 65536:
        raise LaunchError(f"--master-port ({options.master_port}) must be in 1..65535")

    # data
    validate_plan_data(resolved)

    # fit
    evaluation = evaluate_fit(plan)
    forced = False
    if evaluation is not None and not evaluation.fits:
        if not options.force:
            raise FitRefused(shortfall_message(plan, evaluation), evaluation)
        forced = True

    # run folder
    if options.resume:
        stored = rundir.check_resume_run_dir(run_dir)
        rundir.check_same_plan(stored, resolved, run_dir)
    else:
        rundir.check_fresh_run_dir(run_dir)

    # port
    if options.master_port is not None:
        master_port = options.master_port
    elif is_cpu and options.launcher != "slurm" and nodes.nnodes == 1:
        master_port = free_port()
    else:
        master_port = DEFAULT_MASTER_PORT
    master_here = options.launcher != "slurm" and (nodes.nnodes == 1 or options.node_rank == 0)
    if master_here and not options.dry_run and port_in_use(master_port):
        raise LaunchError(f"master port {master_port} is in use; pass --master-port with a free port")

    env = job_env(plan, nodes, cpu_count=cpu_count, environ=environ, local=options.launcher != "slurm")
    from ..trainer.ds_config import build_ds_config  # pure; imported late (trainer-owned)

    ds_config = build_ds_config(resolved)

    sbatch_text = None
    if options.launcher == "slurm":
        script = build_sbatch(
            run_dir,
            nodes,
            master_port,
            job_name=f"ltune-{plan.model.architecture.name}",
            gpus=not is_cpu,
            env=env,
            cwd=cwd,
            resume=options.resume,
            python=python,
        )
        sbatch_text = script.render()
        sbatch_name = "resume.sbatch" if options.resume else rundir.SBATCH_FILE
        argv = ["sbatch", str(run_dir / sbatch_name)]
    elif options.launcher == "torchrun":
        argv = torchrun_argv(
            run_dir, nodes, master_port, resume=options.resume,
            master_addr=options.master_addr, node_rank=options.node_rank, python=python,
        )
    else:
        argv = deepspeed_argv(
            run_dir, nodes, master_port, resume=options.resume, hostfile=hostfile,
            master_addr=options.master_addr, node_rank=options.node_rank, python=python,
            visible_devices=None if is_cpu else (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES"),
        )

    spec = LaunchSpec(
        launcher=options.launcher,
        run_dir=run_dir,
        plan=resolved,
        argv=tuple(argv),
        env=env,
        cwd=cwd,
        ds_config=ds_config,
        nodes=nodes,
        master_port=master_port,
        sbatch=sbatch_text,
        evaluation=evaluation,
        forced=forced,
        resume=options.resume,
    )
    if options.resume:
        files = {"resume.sbatch": sbatch_text} if sbatch_text is not None else {}
    else:
        files = rundir.launch_files(resolved, ds_config, spec.command, sbatch_text)
    return replace(spec, files=files)
