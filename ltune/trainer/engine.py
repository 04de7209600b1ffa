"""Process group, optimizer, LR schedule and the DeepSpeed engine.

Optimizer (our choice, not in ds_config.json): torch.optim.AdamW with the plan's lr,
betas and weight decay; DeepSpeedCPUAdam (adamw_mode) when the optimizer is offloaded,
since DeepSpeed insists on its CPU Adam there (zero_force_ds_cpu_optimizer). Weight
decay applies to matrices only (ndim >= 2), not to norms and biases.

Schedule: linear warmup over warmup_steps to the peak lr, then cosine decay to zero at
the last step; stepped by DeepSpeed once per optimizer step. Gradient clipping and
bf16 / fp16 dynamic loss scaling come from ds_config.json.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import torch

from ..planner.schema import Plan


def init_distributed(timeout_minutes: float | None = None) -> None:
    """Join the job's process group (NCCL on CUDA, gloo on CPU: DeepSpeed's accelerator decides).

    timeout_minutes (the plan's training.collective_timeout_minutes): how long a rank waits in
    any collective of the group before it fails; None: DeepSpeed's default (10 minutes, or
    $DEEPSPEED_TIMEOUT).
    """
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        share_cpu_threads()
    if timeout_minutes is None:
        deepspeed.init_distributed()
    else:
        deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes))


def share_cpu_threads() -> None:
    """On CPU, split the cores between the node's processes (unless OMP_NUM_THREADS says otherwise).

    Each process would otherwise start one compute thread per core, and N processes
    on N cores thrash (slower, and gloo collectives wait on descheduled threads).
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // local))


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        # under ZeRO-3 the local tensor is a flat partition: ds_shape is the real shape
        ndim = len(getattr(param, "ds_shape", param.shape))
        (decay if ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(plan: Plan, model: torch.nn.Module) -> torch.optim.Optimizer:
    training = plan.training
    groups = param_groups(model, training.weight_decay)
    if plan.layout.offload in ("optimizer", "all"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=training.learning_rate, betas=tuple(training.betas), adamw_mode=True)
    return torch.optim.AdamW(groups, lr=training.learning_rate, betas=tuple(training.betas))


def initialize(plan: Plan, ds_config: dict, model: torch.nn.Module, total_steps: int, mpu=None):
    """The DeepSpeed engine around ``model``, with our optimizer and schedule.

    mpu: DeepSpeed's sequence-parallel groups when sp_degree > 1
    (``sequence_parallel.init_sp_groups``), so that ZeRO shards and reduces over all ranks.
    """
    import deepspeed

    optimizer = build_optimizer(plan, model)
    warmup = plan.training.warmup_steps

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total_steps))

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu
    )
    return engine
