"""The launcher command lines, as argument lists (never a shell string).

Every process runs the same trainer entry, ``python -m ltune.trainer RUN_DIR [--resume]``.

DeepSpeed's runner (deepspeed/launcher/runner.py, 0.19): ``--num_gpus`` (alias
``--num_accelerators``) caps the processes per node, ``--num_nodes`` takes the first N
hosts of ``--hostfile`` (MPI style, ``host slots=N``), ``--module`` runs the script as
``python -m``, ``--no_local_rank`` keeps ``--local_rank=i`` off the trainer's command
line (LOCAL_RANK is in the environment anyway), ``--no_ssh --node_rank R`` starts one
node by hand. Without a hostfile it runs on localhost with master_addr 127.0.0.1. On a
CPU-only host it works with ``DS_ACCELERATOR=cpu``: ``--num_gpus 2`` starts two
processes (checked here with deepspeed 0.19.8 and a gloo all-reduce).

torchrun (``python -m torch.distributed.run --help``, torch 2.13): ``--nproc-per-node``,
``--nnodes``, ``--node-rank``, ``--master-addr``, ``--master-port``, ``-m``. A stop: torchrun
forwards the signals of ``--signals-to-handle`` to its workers (default SIGTERM, SIGINT, SIGHUP,
SIGQUIT: torch/distributed/elastic/multiprocessing/api.py ``start``), then kills them after
``--shutdown-timeout`` seconds (default 30: launcher/api.py). SIGUSR1 (Slurm's usual pre-timeout
signal) is added to the list, so torchrun forwards it instead of dying of it (its default
action), and the timeout is the plan's stop grace (the step in flight and a checkpoint save).
Both flags are recent (pytorch/pytorch#160690, August 2025; checked in torch 2.13's run.py): an
older torchrun refuses them at start.

Both are started through the current interpreter (``sys.executable -m ...``) so the job
runs in the same environment as ``ltune`` itself, whatever ``deepspeed`` or ``torchrun``
is first on PATH.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import LaunchError

TRAINER_MODULE = "ltune.trainer"
#: what torchrun forwards to its workers: its default list and SIGUSR1
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
DEFAULT_MASTER_PORT = 29500
LOCALHOST = "127.0.0.1"


def trainer_args(run_dir: Path, resume: bool) -> list[str]:
    """What follows ``-m ltune.trainer``."""
    return [str(run_dir)] + (["--resume"] if resume else [])


@dataclass(frozen=True)
class NodeLayout:
    """How the plan's processes spread over nodes."""

    nnodes: int
    nproc_per_node: int


def node_layout(
    num_gpus: int,
    plan_num_nodes: int,
    gpus_per_node: int,
    gpu_name: str,
    nnodes_override: int | None = None,
    allow_oversubscribe: bool = False,
) -> NodeLayout:
    """Nodes and processes per node for ``num_gpus`` processes.

    The node count is ``--nnodes`` when given, else the plan's ``hardware.num_nodes``
    raised to as many nodes as the GPU profile's ``gpus_per_node`` needs.
    """
    if nnodes_override is not None:
        if nnodes_override < 1:
            raise LaunchError(f"--nnodes ({nnodes_override}) must be at least 1")
        nnodes = nnodes_override
    else:
        nnodes = max(plan_num_nodes, math.ceil(num_gpus / gpus_per_node))
    if num_gpus % nnodes:
        raise LaunchError(
            f"layout.num_gpus ({num_gpus}) does not split evenly over {nnodes} nodes"
        )
    nproc = num_gpus // nnodes
    if nproc > gpus_per_node and not allow_oversubscribe:
        raise LaunchError(
            f"{nproc} processes per node exceed gpus_per_node ({gpus_per_node}) of '{gpu_name}'; "
            f"layout.num_gpus ({num_gpus}) needs at least {math.ceil(num_gpus / gpus_per_node)} nodes"
        )
    return NodeLayout(nnodes=nnodes, nproc_per_node=nproc)


# ---------------------------------------------------------------- hostfile

_HOST_RE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


def read_hostfile(path: str | Path) -> dict[str, int]:
    """An MPI-style hostfile (``worker-0 slots=8`` per line, ``#`` comments) as host -> slots.

    The format is DeepSpeed's (runner.py ``_parse_hostfile``); checked here so a bad file
    is a one-line error before anything starts.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise LaunchError(f"hostfile {path}: no such file") from None
    except OSError as e:
        raise LaunchError(f"hostfile {path}: cannot read ({e.strerror})") from None
    hosts: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _HOST_RE.match(line)
        if not m:
            raise LaunchError(f"hostfile {path}:{lineno}: expected 'HOST slots=N', got {line!r}")
        host, slots = m.group(1), int(m.group(2))
        if host in hosts:
            raise LaunchError(f"hostfile {path}:{lineno}: host {host!r} listed twice")
        hosts[host] = slots
    if not hosts:
        raise LaunchError(f"hostfile {path}: no hosts listed")
    return hosts


def check_hostfile(hosts: dict[str, int], layout: NodeLayout, path: str | Path) -> None:
    if len(hosts) < layout.nnodes:
        raise LaunchError(
            f"hostfile {path} lists {len(hosts)} hosts; the plan needs {layout.nnodes} nodes"
        )
    for host in list(hosts)[: layout.nnodes]:
        if hosts[host] < layout.nproc_per_node:
            raise LaunchError(
                f"hostfile {path}: {host} has slots={hosts[host]}; the plan needs "
                f"{layout.nproc_per_node} processes per node"
            )


# ---------------------------------------------------------------- argv builders


def deepspeed_argv(
    run_dir: Path,
    layout: NodeLayout,
    master_port: int,
    *,
    resume: bool = False,
    hostfile: str | None = None,
    master_addr: str | None = None,
    node_rank: int | None = None,
    python: str | None = None,
    visible_devices: str | None = None,
) -> list[str]:
    """``deepspeed [resources] --master_port P --no_local_rank --module ltune.trainer RUN_DIR``.

    ``visible_devices`` (CUDA_VISIBLE_DEVICES, single node): DeepSpeed's runner drops that
    variable and, given ``--num_gpus``, would use devices 0..N-1 instead; the chosen
    devices are passed as ``--include localhost:i,j`` so the job stays on them.
    """
    argv = [python or sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile is None:
        if layout.nnodes > 1:
            raise LaunchError(
                f"the deepspeed launcher needs --hostfile for {layout.nnodes} nodes "
                "(or use --launcher torchrun with --nnodes/--node-rank/--master-addr)"
            )
        if node_rank not in (None, 0):
            raise LaunchError(f"--node-rank ({node_rank}) needs several nodes")
        devices = [d.strip() for d in (visible_devices or "").split(",") if d.strip()]
        if devices:
            if len(devices) < layout.nproc_per_node:
                raise LaunchError(
                    f"CUDA_VISIBLE_DEVICES ({visible_devices}) lists {len(devices)} devices; "
                    f"the plan needs {layout.nproc_per_node}"
                )
            argv += ["--include", "localhost:" + ",".join(devices[: layout.nproc_per_node])]
        else:
            argv += ["--num_gpus", str(layout.nproc_per_node)]
    else:
        argv += [
            "--hostfile", str(hostfile),
            "--num_nodes", str(layout.nnodes),
            "--num_gpus", str(layout.nproc_per_node),
        ]
        if node_rank is not None:
            # each node started by hand: no ssh, this node's rank, the master given
            if master_addr is None:
                raise LaunchError("--node-rank with the deepspeed launcher needs --master-addr")
            _check_node_rank(node_rank, layout.nnodes)
            argv += ["--no_ssh", "--node_rank", str(node_rank)]
        if master_addr is not None:
            argv += ["--master_addr", master_addr]
    argv += ["--master_port", str(master_port), "--no_local_rank", "--module", TRAINER_MODULE]
    return argv + trainer_args(run_dir, resume)


def torchrun_argv(
    run_dir: Path,
    layout: NodeLayout,
    master_port: int,
    *,
    resume: bool = False,
    master_addr: str | None = None,
    node_rank: int | None = None,
    python: str | None = None,
    shutdown_timeout_s: int = 30,
) -> list[str]:
    """``torchrun --nproc-per-node G --nnodes N --node-rank R --master-addr A --master-port P
    --signals-to-handle ...,SIGUSR1 --shutdown-timeout S -m ltune.trainer RUN_DIR``."""
    if layout.nnodes > 1:
        if master_addr is None:
            raise LaunchError(f"torchrun on {layout.nnodes} nodes needs --master-addr (node 0's address)")
        if node_rank is None:
            raise LaunchError(f"torchrun on {layout.nnodes} nodes needs --node-rank (0..{layout.nnodes - 1})")
    node_rank = 0 if node_rank is None else node_rank
    _check_node_rank(node_rank, layout.nnodes)
    return [
        python or sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(layout.nproc_per_node),
        "--nnodes", str(layout.nnodes),
        "--node-rank", str(node_rank),
        "--master-addr", master_addr or LOCALHOST,
        "--master-port", str(master_port),
        *torchrun_stop_args(shutdown_timeout_s),
        "-m", TRAINER_MODULE,
    ] + trainer_args(run_dir, resume)


def torchrun_stop_args(shutdown_timeout_s: int) -> list[str]:
    """torchrun's flags for a stop: forward SIGUSR1 too, and wait this long before killing the workers."""
    return ["--signals-to-handle", TORCHRUN_SIGNALS, "--shutdown-timeout", str(shutdown_timeout_s)]


def _check_node_rank(node_rank: int, nnodes: int) -> None:
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"--node-rank ({node_rank}) must be in 0..{nnodes - 1}")
