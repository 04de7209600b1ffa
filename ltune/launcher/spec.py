"""Planning a launch: plan + options -> LaunchSpec (data only; nothing written or started).

Checks run in this order, each a LaunchError before anything is written: node layout and
hostfile, the plan's paths and data, fit (FitRefused, exit 1, unless --force), run folder,
master port.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Mapping

from ..job.ds_config import build_ds_config
from ..planner import checkpointing
from ..planner.fit import check_fit
from ..job.paths import validate_plan_paths
from ..planner.io import short_repr
from ..planner.memory import SAFETY_MARGIN
from ..planner.schema import CONTROL_CHARACTERS, Evaluation, Plan, Prediction
from ..profiles import GIB, ProfileError, load_gpu
from . import dsenv, rundir
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
from .slurm import build_sbatch, job_name_for

Launcher = Literal["deepspeed", "torchrun", "slurm"]
LAUNCHERS: tuple[str, ...] = ("deepspeed", "torchrun", "slurm")
CPU_TARGET = "cpu"
#: slurm's --cpus-per-task when hardware.cpus_per_node is unset: cores per GPU process (DGX H100:
#: 112 cores for 8 GPUs, DGX A100: 128 for 8; 8 a GPU still fits 64-96-core HGX nodes)
DEFAULT_CPUS_PER_PROCESS = 8


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
    progress: str | None = None  # LTUNE_PROGRESS for the trainer: "tty" when ltune's output is a terminal


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
    evaluation: Evaluation | None = None  # the planner's re-check of the plan
    forced: bool = False  # the plan does not fit and --force launches it anyway
    resume: bool = False
    files: dict[str, str] = field(default_factory=dict)  # name -> text, written into run_dir
    grace_s: int = checkpointing.MIN_STOP_GRACE_S  # how long ltune waits for the ranks after its launcher exits
    warnings: tuple[str, ...] = ()  # one line each, printed before the job starts

    @property
    def command(self) -> dict[str, Any]:
        """command.json: the exact argv, the environment added, the working folder."""
        return {"argv": list(self.argv), "env": dict(self.env), "cwd": str(self.cwd)}


# ---------------------------------------------------------------- fit


def evaluate_fit(plan: Plan) -> Evaluation:
    """The planner's re-check of the plan on its target."""
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


def node_cores(plan: Plan, nodes: NodeLayout, cpu_count: int | None = None, local: bool = True) -> int:
    """CPU cores of one node for the job: hardware.cpus_per_node; else, launched here, this
    machine's (the nodes of a hostfile are taken to be alike); else (slurm) DEFAULT_CPUS_PER_PROCESS
    per process."""
    if plan.hardware.cpus_per_node is not None:
        return plan.hardware.cpus_per_node
    if local:
        return cpu_count or _usable_cpus()
    return DEFAULT_CPUS_PER_PROCESS * nodes.nproc_per_node


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def job_env(
    plan: Plan,
    nodes: NodeLayout,
    cpu_count: int | None = None,
    environ: Mapping[str, str] | None = None,
    local: bool = True,
    progress: str | None = None,
) -> dict[str, str]:
    """Variables added to the job's environment.

    PYTHONUNBUFFERED: torchrun's workers would otherwise buffer their output in pipes.
    OMP_NUM_THREADS = the node's cores (``node_cores``) / processes per node, so ranks do not
    oversubscribe cores, nor run their CPU work (DeepSpeed's CPU Adam under offload) on one
    thread, which torchrun sets when the variable is unset (torch/distributed/run.py). A value
    already in the environment is kept for a local launch (a slurm job always gets the computed one).
    On the cpu target: DS_ACCELERATOR=cpu (DeepSpeed's CPU accelerator, gloo).
    LTUNE_PROGRESS = ``progress`` ("tty": the trainer draws one live progress line, as its own
    stderr is a pipe under the DeepSpeed launcher) for a local launch, unless already set.
    """
    environ = os.environ if environ is None else environ
    env = {"PYTHONUNBUFFERED": "1"}
    if plan.hardware.gpu == CPU_TARGET:
        env["DS_ACCELERATOR"] = "cpu"
    if not (local and "OMP_NUM_THREADS" in environ):
        env["OMP_NUM_THREADS"] = str(max(1, node_cores(plan, nodes, cpu_count, local) // nodes.nproc_per_node))
    if progress is not None and local and "LTUNE_PROGRESS" not in environ:
        env["LTUNE_PROGRESS"] = progress
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
    The steps run in the order of the module docstring's checks.
    """
    _check_launcher(options.launcher)
    _check_option_strings(options)
    try:
        return _plan_launch(plan, plan_path, options, cwd=cwd, python=python, cpu_count=cpu_count, environ=environ)
    except OSError as e:  # a path the system refuses: a name too long, a loop of links
        raise LaunchError(f"cannot use {short_repr(str(e.filename or plan_path))}: {e.strerror}") from None


def _plan_launch(
    plan: Plan,
    plan_path: str | Path,
    options: LaunchOptions,
    *,
    cwd: str | Path | None,
    python: str | None,
    cpu_count: int | None,
    environ: Mapping[str, str] | None,
) -> LaunchSpec:
    """plan_launch's steps (an OSError from the file system is plan_launch's to report)."""
    cwd = Path(cwd or os.getcwd()).resolve()
    try:
        plan_dir = Path(plan_path).expanduser().resolve().parent
        run_dir = rundir.default_run_dir(plan, options.run_dir, cwd)
        resolved = rundir.resolve_plan(plan, plan_dir, run_dir)
    except RuntimeError as e:  # ~user of an unknown user
        raise LaunchError(f"{_unexpandable(plan, options)}: cannot expand its ~ ({e})") from None
    nodes = _node_layout(plan, options)
    hostfile = _checked_hostfile(options, nodes)
    _check_master_port_range(options.master_port)
    problems = validate_plan_paths(plan, plan_dir)
    if problems and not options.dry_run:
        raise LaunchError(problems[0])
    try:
        validate_plan_data(resolved)
    except (LaunchError, OSError) as e:  # a dry run shows what a real launch would refuse
        if not options.dry_run:
            raise
        text = str(e) if isinstance(e, LaunchError) else f"cannot read the data: {e.strerror or e}"
        if not any(p in text or text in p for p in problems):
            problems.append(text)
    evaluation, forced = _fit_or_refuse(plan, options.force)
    resolved = _with_prediction(resolved, evaluation, nodes)
    checkpoint = resolved.prediction.checkpoint
    _check_run_dir(run_dir, resolved, options.resume)
    master_port = _master_port(plan, options, nodes)
    env = job_env(plan, nodes, cpu_count=cpu_count, environ=environ, local=options.launcher != "slurm",
                  progress=options.progress)
    ds_config = build_ds_config(resolved)
    argv, sbatch_text = _launch_argv(
        plan, options, run_dir, nodes, master_port,
        env=env, cwd=cwd, hostfile=hostfile, python=python, environ=environ, checkpoint=checkpoint,
        step_time_s=evaluation.throughput.step_time_s,
    )
    warnings = [f"{p} (a real launch refuses this plan until it is fixed)" for p in problems]  # dry run only
    warnings += stop_warnings(options.launcher, evaluation.throughput.step_time_s, checkpoint)
    extra_files: dict[str, str] = {}
    if hostfile is not None:
        env[dsenv.DS_ENV_FILE_VAR] = str(run_dir / dsenv.ENV_FILE)
        extra_files[dsenv.ENV_FILE], skipped = dsenv.env_file(
            env, os.environ if environ is None else environ, _user_ds_env_files(cwd, environ))
        if skipped:
            warnings.append(f"{', '.join(skipped)}: not carried to the other nodes ({dsenv.ENV_FILE}: a value with "
                            "quotes, $, backquotes, backslashes, control characters or edge spaces)")
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
        grace_s=checkpoint.stop_grace_s,
        warnings=tuple(warnings),
    )
    return replace(spec, files={**_run_dir_files(spec), **extra_files})


def stop_warnings(launcher: str, step_time_s: float, checkpoint) -> list[str]:
    """One line when a stop (SIGTERM) cannot save in time: DeepSpeed's launch.py kills the ranks
    DEEPSPEED_LAUNCH_GRACE_S after it, not configurable (torchrun's wait is set to the plan's grace,
    slurm's signal comes early enough)."""
    need = step_time_s + checkpoint.save_time_s
    if launcher == "deepspeed" and need > checkpointing.DEEPSPEED_LAUNCH_GRACE_S:
        return [
            f"a stop (SIGTERM, Ctrl-C) gives the ranks {checkpointing.DEEPSPEED_LAUNCH_GRACE_S} s (DeepSpeed's launch.py) "
            f"but finishing a step and saving takes ~{need:.0f} s (step {step_time_s:.1f} s + save "
            f"{checkpoint.save_time_s:.0f} s of {checkpoint.max_node_bytes / 1e9:.0f} GB per node): its checkpoint would "
            f"be cut short; --launcher torchrun waits {checkpoint.stop_grace_s} s"
        ]
    return []


def _user_ds_env_files(cwd: Path, environ: Mapping[str, str] | None) -> list[str]:
    """The user's own DeepSpeed env files, where the runner would have read them (~ and the
    current folder, under DS_ENV_FILE's name or .deepspeed_env)."""
    environ = os.environ if environ is None else environ
    name = environ.get(dsenv.DS_ENV_FILE_VAR) or dsenv.DEFAULT_DS_ENV_NAME
    texts = []
    for folder in (Path(environ.get("HOME") or "~").expanduser(), cwd):
        path = folder / name
        try:
            if path.is_file():
                texts.append(path.read_text())
        except (OSError, UnicodeDecodeError):
            continue
    return texts


# ---------------------------------------------------------------- the steps of plan_launch


def _check_launcher(launcher: str) -> None:
    if launcher not in LAUNCHERS:
        raise LaunchError(f"--launcher must be one of {', '.join(LAUNCHERS)} (got {short_repr(launcher)})")


def _unexpandable(plan: Plan, options: LaunchOptions) -> str:
    """The first of the plan's paths (and --run-dir) that starts with ~ of an unknown user."""
    given = [("--run-dir", options.run_dir), ("training.output_dir", plan.training.output_dir),
             ("model.path", plan.model.path), ("model.tokenizer", plan.model.tokenizer),
             *(("training.data", p) for p in plan.training.data)]
    for field, value in given:
        try:
            Path(value or "").expanduser()
        except RuntimeError:
            return f"{field} {short_repr(value)}"
    return "a path of the plan"


def _check_option_strings(options: LaunchOptions) -> None:
    """Paths and addresses that reach a file name, a command or a script: one printable line."""
    for flag, value in (("--run-dir", options.run_dir), ("--hostfile", options.hostfile),
                        ("--master-addr", options.master_addr)):
        if value is None:
            continue
        if not value or CONTROL_CHARACTERS.search(value):
            raise LaunchError(f"{flag}: {short_repr(value)} must be non-empty, without control characters")


def _node_layout(plan: Plan, options: LaunchOptions) -> NodeLayout:
    """Nodes and processes per node from the plan's GPUs and the target's GPUs per node
    (the cpu target may put more processes on a node than it has cores)."""
    try:
        gpu = load_gpu(plan.hardware.gpu)
    except ProfileError as e:
        raise LaunchError(f"hardware.gpu: {e}") from None
    return node_layout(
        plan.layout.num_gpus,
        plan.hardware.num_nodes,
        gpu.gpus_per_node,
        gpu.name,
        nnodes_override=options.nnodes,
        allow_oversubscribe=plan.hardware.gpu == CPU_TARGET,
    )


def _checked_hostfile(options: LaunchOptions, nodes: NodeLayout) -> str | None:
    """--hostfile, checked against the node layout (deepspeed launcher only); its absolute path."""
    if options.hostfile is None:
        return None
    if options.launcher != "deepspeed":
        raise LaunchError("--hostfile is read by the deepspeed launcher only (--launcher deepspeed)")
    check_hostfile(read_hostfile(options.hostfile), nodes, options.hostfile)
    return str(Path(options.hostfile).expanduser().resolve()) if options.hostfile else None


def _with_prediction(resolved: Plan, evaluation: Evaluation, nodes: NodeLayout) -> Plan:
    """The run folder's plan carries today's re-check as its prediction, so the job's
    metrics stand beside numbers for the layout it really runs (an edited plan's stale
    prediction would not); its checkpoint policy (the trainer's interval) comes from it too."""
    margin = resolved.prediction.safety_margin if resolved.prediction else SAFETY_MARGIN
    training = resolved.training
    checkpoint = checkpointing.predict_checkpoint(
        checkpointing.saved_params(resolved.model.architecture, resolved.method), resolved.layout, training.precision,
        nodes.nproc_per_node, evaluation.throughput.step_time_s, checkpoint_every=training.checkpoint_every,
        checkpoint_minutes=training.checkpoint_minutes,
        storage_write_bytes_per_s=resolved.hardware.storage_write_bytes_per_s,
    )
    prediction = Prediction(memory=evaluation.memory, throughput=evaluation.throughput, safety_margin=margin,
                            checkpoint=checkpoint)
    return resolved.model_copy(update={"prediction": prediction})


def _check_master_port_range(master_port: int | None) -> None:
    if master_port is not None and not 0 < master_port < 65536:
        raise LaunchError(f"--master-port ({master_port}) must be in 1..65535")


def _fit_or_refuse(plan: Plan, force: bool) -> tuple[Evaluation, bool]:
    """The planner's fit check and whether --force overrides a failed one (else FitRefused)."""
    evaluation = evaluate_fit(plan)
    if evaluation.fits:
        return evaluation, False
    if not force:
        raise FitRefused(shortfall_message(plan, evaluation), evaluation)
    return evaluation, True


def _check_run_dir(run_dir: Path, resolved: Plan, resume: bool) -> None:
    """A resumed run continues the same plan in its folder; a new run needs a fresh folder."""
    if resume:
        stored = rundir.check_resume_run_dir(run_dir)
        rundir.check_same_plan(stored, resolved, run_dir)
    else:
        rundir.check_fresh_run_dir(run_dir)


def _master_port(plan: Plan, options: LaunchOptions, nodes: NodeLayout) -> int:
    """--master-port, else a free port (single-node cpu runs started here), else the default;
    refused if in use where the master runs on this machine (unless a dry run)."""
    if options.master_port is not None:
        master_port = options.master_port
    elif plan.hardware.gpu == CPU_TARGET and options.launcher != "slurm" and nodes.nnodes == 1:
        master_port = free_port()
    else:
        master_port = DEFAULT_MASTER_PORT
    master_here = options.launcher != "slurm" and (nodes.nnodes == 1 or options.node_rank == 0)
    if master_here and not options.dry_run and port_in_use(master_port):
        raise LaunchError(f"master port {master_port} is in use; pass --master-port with a free port")
    return master_port


def _launch_argv(
    plan: Plan,
    options: LaunchOptions,
    run_dir: Path,
    nodes: NodeLayout,
    master_port: int,
    *,
    env: dict[str, str],
    cwd: Path,
    hostfile: str | None,
    python: str | None,
    environ: Mapping[str, str] | None,
    checkpoint,
    step_time_s: float,
) -> tuple[list[str], str | None]:
    """The launcher's argv and, for slurm, the sbatch script text it submits."""
    is_cpu = plan.hardware.gpu == CPU_TARGET
    if options.launcher == "slurm":
        try:
            script = build_sbatch(
                run_dir,
                nodes,
                master_port,
                job_name=job_name_for(plan.model.architecture.name),
                gpus=not is_cpu,
                env=env,
                cwd=cwd,
                resume=options.resume,
                python=python,
                cpus_per_task=node_cores(plan, nodes, local=False),
                signal_s=checkpointing.slurm_signal_s(step_time_s, checkpoint.save_time_s),
                shutdown_timeout_s=checkpoint.stop_grace_s,
            )
        except ValueError as e:
            raise LaunchError(str(e)) from None
        sbatch_name = "resume.sbatch" if options.resume else rundir.SBATCH_FILE
        return ["sbatch", str(run_dir / sbatch_name)], script.render()
    if options.launcher == "torchrun":
        argv = torchrun_argv(
            run_dir, nodes, master_port, resume=options.resume,
            master_addr=options.master_addr, node_rank=options.node_rank, python=python,
            shutdown_timeout_s=checkpoint.stop_grace_s,
        )
        return argv, None
    argv = deepspeed_argv(
        run_dir, nodes, master_port, resume=options.resume, hostfile=hostfile,
        master_addr=options.master_addr, node_rank=options.node_rank, python=python,
        visible_devices=None if is_cpu else (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES"),
    )
    return argv, None


def _run_dir_files(spec: LaunchSpec) -> dict[str, str]:
    """What the launch writes into the run folder: a resume writes only its sbatch script."""
    if spec.resume:
        return {"resume.sbatch": spec.sbatch} if spec.sbatch is not None else {}
    return rundir.launch_files(spec.plan, spec.ds_config, spec.command, spec.sbatch)
