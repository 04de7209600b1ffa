"""Checkpoint policy of a plan: how big a checkpoint is, how long it takes to save, how often.

Sizes are what DeepSpeed 0.19's ``engine.save_checkpoint`` writes (runtime/engine.py
``_save_checkpoint``, ``_save_zero_checkpoint``, ``_get_ckpt_name``, ``_get_zero_ckpt_name``),
checked against the files a 2-process CPU run writes at every stage (tests/test_checkpoint_policy.py):

- ZeRO-0: data-parallel rank 0 alone writes ``mp_rank_00_model_states.pt``: the module in the
  model dtype and the whole optimizer (mixed precision: FP16_UnfusedOptimizer's fp32 master
  copy and 2 Adam moments; fp32: torch AdamW's 2 moments, no master copy);
- ZeRO-1/2: rank 0 writes the module in the model dtype (``mp_rank_00_model_states.pt``);
  every rank writes its 1/N of the fp32 master copy and the 2 moments
  (``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt``; DeepSpeed's ZeRO optimizer keeps a
  master copy in fp32 training too);
- ZeRO-3: every rank writes its 1/N of the fp32 master copy and the moments, and a model-states
  file whose weights are empty placeholders (a few KB): the 16-bit weights are not saved.

Adapter runs (LoRA, QLoRA) are saved with ``exclude_frozen_parameters=True``
(engine.py ``module_state_dict`` drops every ``requires_grad=False`` entry of
``named_parameters()``; ``_save_checkpoint``: ``save_frozen_param`` False, so no frozen fragments
either): the module file holds the trainable parameters, the optimizer files the states of the
trainable parameters (the only ones the optimizer owns). So every count above is of the trainable
parameters T instead of P. QLoRA's 4-bit layers would add their quantization constants, which
are not parameters (bitsandbytes ``Linear4bit._save_to_state_dict``), but the trainer's state-dict
hook drops every key that is not an adapter's (ltune/trainer/lora.py ``_adapters_only``): the 4-bit
base is quantized again from the plan's model on resume.

N is every rank: under Ulysses the ZeRO partitions span the sequence-parallel ranks too
(engine.py ``groups._get_sequence_data_parallel_rank``). ltune's own files (the rank state, the
marker) are a few KB. Offloading changes where the states live, not what is saved.

Save time: ranks write at once, so the busiest node (node 0, with rank 0) bounds the save:
its bytes over one node's write bandwidth to the shared file system.
"""

from __future__ import annotations

import math

from ..profiles.schema import ModelProfile
from . import lora
from .schema import CheckpointPrediction, Layout, Method, Precision

FP32_BYTES = 4
ADAM_MOMENTS = 2  # exp_avg, exp_avg_sq (Kingma & Ba 2015, Algorithm 1)
#: one node's write bandwidth to a shared parallel file system, bytes/s. An assumption in the
#: middle of the 1-5 GB/s that network file systems give one client (kube-dojo "High-Performance
#: Storage for AI", throughput table: network storage 1-5 GB/s); a node writing through one
#: 200 Gb/s link tops out near 25 GB/s. Set hardware.storage_write_bytes_per_s for your storage.
DEFAULT_STORAGE_WRITE_BYTES_PER_S = 2e9
#: a stop (SIGTERM, Slurm's SIGUSR1) must leave time for the step in flight and a save: their
#: predicted sum times this factor (shared file systems vary under load; an assumption)
STOP_SAFETY_FACTOR = 2.0
#: ltune's wait for the job's processes after its launcher exits never goes below its old fixed 60 s
MIN_STOP_GRACE_S = 60
#: Slurm's pre-timeout signal comes at least this long before the end
MIN_SLURM_SIGNAL_S = 120
#: sbatch --signal's sig_time is at most 65535 s (sbatch(1))
MAX_SLURM_SIGNAL_S = 65535
#: DeepSpeed's launch.py kills its ranks this long after a SIGTERM (terminate_process_tree,
#: psutil.wait_procs(timeout=30)); not configurable
DEEPSPEED_LAUNCH_GRACE_S = 30


def model_weight_bytes(precision: Precision) -> int:
    """Bytes of one weight in the model dtype: 2 in bf16/fp16, 4 in fp32."""
    return FP32_BYTES if precision == "fp32" else 2


def optimizer_bytes_per_param(zero_stage: int, precision: Precision) -> int:
    """Optimizer bytes saved per parameter: 2 fp32 moments, plus the fp32 master copy unless
    ZeRO-0 in fp32 (torch AdamW on the fp32 weights themselves; engine.py _common_checkpoint_state)."""
    master = 0 if (zero_stage == 0 and precision == "fp32") else FP32_BYTES
    return master + ADAM_MOMENTS * FP32_BYTES


def checkpoint_total_bytes(num_params: int, zero_stage: int, precision: Precision) -> int:
    """Every rank's files together: ZeRO-0-2 the model-dtype weights and the optimizer; ZeRO-3
    the optimizer only (its weights are placeholders)."""
    weights = 0 if zero_stage == 3 else model_weight_bytes(precision) * num_params
    return weights + optimizer_bytes_per_param(zero_stage, precision) * num_params


def rank_bytes(num_params: int, zero_stage: int, precision: Precision, num_gpus: int, rank: int) -> int:
    """What rank ``rank`` writes: ZeRO-0 all of it on rank 0; ZeRO-1/2 the weights on rank 0 and
    ceil(1/N) of the optimizer on every rank; ZeRO-3 ceil(1/N) of the optimizer on every rank."""
    if zero_stage == 0:
        return checkpoint_total_bytes(num_params, 0, precision) if rank == 0 else 0
    share = optimizer_bytes_per_param(zero_stage, precision) * math.ceil(num_params / num_gpus)
    weights = model_weight_bytes(precision) * num_params if (zero_stage in (1, 2) and rank == 0) else 0
    return weights + share


def busiest_node_bytes(num_params: int, zero_stage: int, precision: Precision, num_gpus: int,
                       procs_per_node: int) -> int:
    """What node 0 (ranks 0..procs_per_node-1, rank 0 the busiest) writes."""
    per_node = min(procs_per_node, num_gpus)
    return rank_bytes(num_params, zero_stage, precision, num_gpus, 0) + (per_node - 1) * rank_bytes(
        num_params, zero_stage, precision, num_gpus, 1)


def save_time_s(node_bytes: int, storage_write_bytes_per_s: float) -> float:
    """Seconds to save: the busiest node's bytes over its write bandwidth."""
    return node_bytes / storage_write_bytes_per_s


def every_steps(checkpoint_every: int | None, checkpoint_minutes: float, step_time_s: float) -> int:
    """Steps between checkpoints: checkpoint_every when set (0: only at the end), else as many whole
    steps of the predicted step time as fit in checkpoint_minutes (at least 1)."""
    if checkpoint_every is not None:
        return checkpoint_every
    if step_time_s <= 0:
        return 1
    return max(1, math.floor(checkpoint_minutes * 60 / step_time_s))


def stop_time_s(step_time_s: float, save_s: float) -> int:
    """Seconds a stop needs: the step in flight and a save, times STOP_SAFETY_FACTOR, rounded up."""
    return math.ceil(STOP_SAFETY_FACTOR * (step_time_s + save_s))


def stop_grace_s(step_time_s: float, save_s: float) -> int:
    """How long the launcher waits for the ranks after a stop: stop_time_s, at least MIN_STOP_GRACE_S."""
    return max(MIN_STOP_GRACE_S, stop_time_s(step_time_s, save_s))


def slurm_signal_s(step_time_s: float, save_s: float) -> int:
    """sbatch --signal=USR1@<this>: stop_time_s, at least MIN_SLURM_SIGNAL_S, at most MAX_SLURM_SIGNAL_S."""
    return min(MAX_SLURM_SIGNAL_S, max(MIN_SLURM_SIGNAL_S, stop_time_s(step_time_s, save_s)))


def saved_params(model: ModelProfile, method: Method) -> int:
    """The parameters a checkpoint saves (with their optimizer states): all of them for full
    fine-tuning, the adapters only under LoRA/QLoRA (see the module docstring)."""
    return lora.trainable_params(model, method)


def predict_checkpoint(
    saved_params: int,
    layout: Layout,
    precision: Precision,
    procs_per_node: int,
    step_time_s: float,
    *,
    checkpoint_every: int | None = None,
    checkpoint_minutes: float = 30,
    storage_write_bytes_per_s: float | None = None,
) -> CheckpointPrediction:
    """The checkpoint terms of one layout (sizes, save time, interval, stop grace); `saved_params`:
    the parameters saved with their optimizer states (`saved_params`: all, or the adapters)."""
    bandwidth = storage_write_bytes_per_s or DEFAULT_STORAGE_WRITE_BYTES_PER_S
    n, stage = layout.num_gpus, layout.zero_stage
    saved = saved_params
    node = busiest_node_bytes(saved, stage, precision, n, procs_per_node)
    save_s = save_time_s(node, bandwidth)
    return CheckpointPrediction(
        total_bytes=checkpoint_total_bytes(saved, stage, precision),
        max_rank_bytes=rank_bytes(saved, stage, precision, n, 0),
        max_node_bytes=node,
        storage_write_bytes_per_s=bandwidth,
        save_time_s=save_s,
        every_steps=every_steps(checkpoint_every, checkpoint_minutes, step_time_s),
        stop_grace_s=stop_grace_s(step_time_s, save_s),
    )
