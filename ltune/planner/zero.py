"""ZeRO's ownership rule, once: which model states one rank holds, for the planner and the trace.

DeepSpeed mixed precision keeps model-dtype parameters and gradients plus an fp32 master copy
and two fp32 Adam moments (ZeRO paper, Rajbhandari et al. 2020: 2 + 2 + 12 bytes/param in
16-bit). ZeRO shards them over all N ranks (data- and sequence-parallel alike, as
DeepSpeed-Ulysses does):

- ZeRO-0: nothing is sharded. bf16 and fp16 run FP16_UnfusedOptimizer around the trainer's
  torch AdamW (engine.py `_do_optimizer_sanity_check`, grad_accum_dtype left at the model dtype;
  unfused_optimizer.py: whole fp32 master and moments, 16-bit gradients kept and upcast to fp32
  at the step, `fp32_param.grad`); fp32 runs the bare optimizer (fp32 gradients on the parameters, whole moments,
  no master copy). BF16_Optimizer is only chosen at ZeRO-1 with fp32 gradient accumulation,
  which ltune does not configure.
- ZeRO-1/2 (stage_1_and_2.py): all parameters are flattened into one group and each rank owns
  one flat partition for the master copy, the moments and (at the step) the fp32 gradients
  (`single_partition_of_fp32_groups`); ZeRO-2 keeps a model-dtype gradient partition, ZeRO-1
  whole model-dtype gradients. Parameters stay whole.
- ZeRO-3 (partition_parameters.py, stage3.py): each tensor is split on its own; tensors of at
  most `stage3_param_persistence_threshold` elements stay whole on every rank. Model-dtype
  gradients go to `grad_partitions_flat_buffer`; an fp32 master partition is cloned
  (`_create_fp32_partitions`, also in fp32), and fp32 gradients are made one sub-group
  (`sub_group_size`) at a time at the step (`_prepare_fp32_grad_for_sub_group`).
- offload (ZeRO-Offload, Ren et al. 2021): master copy, moments and fp32 gradients live in host
  memory, and so does ZeRO 2-3's model-dtype gradient partition; "all" also moves the ZeRO-3
  parameter partitions there.

`ParamPartition` holds how the parameters split over N ranks, in elements; it is made either
from the planner's aggregate `Shape` or from the trace's per-tensor element counts.
`model_state_bytes` applies the rule above to it. Pure Python: no torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .schema import Layout
from .shape import FP32, Shape

# DeepSpeed ZeRO defaults (deepspeed/runtime/zero/config.py), in elements; ltune writes
# them explicitly into ds_config.json so the plan and the job agree.
REDUCE_BUCKET_SIZE = 500_000_000
ALLGATHER_BUCKET_SIZE = 500_000_000
STAGE3_PREFETCH_BUCKET_SIZE = 50_000_000
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000
STAGE3_PARAM_PERSISTENCE_THRESHOLD = 100_000
SUB_GROUP_SIZE = 1_000_000_000
# ZeRO-0's all-reduce bucket (engine.py MEMORY_OPT_ALLREDUCE_SIZE), elements; not configurable.
ALLREDUCE_BUCKET_SIZE = 500_000_000

#: the per-rank model-state terms, by the planner's term names
MODEL_STATE_TERMS = ("weights", "gradients", "gradients_fp32", "master_weights", "optimizer_states")


class OptimizerWrapper(enum.Enum):
    """What DeepSpeed puts around the trainer's torch AdamW."""

    BARE = "bare"  # ZeRO-0 in fp32: torch AdamW on the parameters themselves, no master copy
    UNFUSED = "unfused"  # ZeRO-0 in bf16/fp16: FP16_UnfusedOptimizer, whole fp32 master copy
    ZERO = "zero"  # ZeRO 1-3: DeepSpeed's ZeRO optimizer, fp32 master partition


def optimizer_wrapper(zero_stage: int, precision: str) -> OptimizerWrapper:
    """DeepSpeed's choice of optimizer wrapper (engine.py `_do_optimizer_sanity_check`)."""
    if zero_stage != 0:
        return OptimizerWrapper.ZERO
    return OptimizerWrapper.BARE if precision == "fp32" else OptimizerWrapper.UNFUSED


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class ParamPartition:
    """How the parameters split over `num_gpus` ranks, in elements, for every ZeRO stage."""

    num_gpus: int
    params: int  # all parameters, P
    largest_leaf_params: int  # the biggest tensor
    persistent_params: int  # tensors ZeRO-3 keeps whole on every rank
    stage3_shard_params: int  # one rank's slice of the tensors ZeRO-3 splits
    stage3_optimizer_params: int  # one rank's ZeRO-3 optimizer partition (every tensor split)
    flat_optimizer_params: int  # one rank's ZeRO 1-2 partition of the flattened group

    @classmethod
    def of_shape(cls, s: Shape, num_gpus: int) -> "ParamPartition":
        """From the planner's aggregate numbers: P // N for the optimizer partitions; ZeRO-3's
        parameter slice is (P - persistent) // N, the persistent tensors counted whole beside it."""
        part = s.params // num_gpus
        return cls(
            num_gpus=num_gpus,
            params=s.params,
            largest_leaf_params=s.largest_leaf_params,
            persistent_params=s.persistent_params,
            stage3_shard_params=(s.params - s.persistent_params) // num_gpus,
            stage3_optimizer_params=part,
            flat_optimizer_params=part,
        )

    @classmethod
    def of_tensors(cls, param_numels: list[int], num_gpus: int) -> "ParamPartition":
        """From the element count of every parameter tensor, as DeepSpeed splits them: ZeRO-3
        ceil(n / N) per tensor, whole at or below the persistence threshold; ZeRO 1-2 ceil(P / N)."""
        params = sum(param_numels)
        persistent = [n for n in param_numels if n <= STAGE3_PARAM_PERSISTENCE_THRESHOLD]
        split = [n for n in param_numels if n > STAGE3_PARAM_PERSISTENCE_THRESHOLD]
        return cls(
            num_gpus=num_gpus,
            params=params,
            largest_leaf_params=max(param_numels),
            persistent_params=sum(persistent),
            stage3_shard_params=sum(_ceil_div(n, num_gpus) for n in split),
            stage3_optimizer_params=sum(_ceil_div(n, num_gpus) for n in param_numels),
            flat_optimizer_params=_ceil_div(params, num_gpus),
        )


def weights_params(p: ParamPartition, lay: Layout) -> int:
    """Model-dtype parameter elements on one rank's GPU: whole under ZeRO 0-2; under ZeRO-3 the
    persistent tensors and the rank's slice, the slice in host memory with offload "all"."""
    if lay.zero_stage < 3:
        return p.params
    if lay.offload == "all":
        return p.persistent_params
    return p.persistent_params + p.stage3_shard_params


def optimizer_params(p: ParamPartition, zero_stage: int) -> int:
    """Elements of one rank's optimizer partition (master copy, moments, fp32 gradients):
    whole at ZeRO-0, the flat partition at ZeRO 1-2, the per-tensor slices at ZeRO-3."""
    if zero_stage == 0:
        return p.params
    if zero_stage < 3:
        return p.flat_optimizer_params
    return p.stage3_optimizer_params


def model_state_bytes(p: ParamPartition, dtype_bytes: int, lay: Layout, precision: str, phase: str) -> dict[str, int]:
    """One rank's model states on the GPU during `phase` by term name (bytes); fp32 gradients
    exist at the "step" phase only (see the module docstring for the rule's sources)."""
    stage, on_gpu = lay.zero_stage, lay.offload == "none"
    wrapper = optimizer_wrapper(stage, precision)
    opt = optimizer_params(p, stage)
    if stage <= 1:
        gradients = p.params
    else:
        gradients = opt if on_gpu else 0
    grads32 = 0
    if phase == "step" and on_gpu and wrapper != OptimizerWrapper.BARE:
        grads32 = opt if stage < 3 else min(opt, SUB_GROUP_SIZE + p.largest_leaf_params // p.num_gpus)
    master = opt if on_gpu and wrapper != OptimizerWrapper.BARE else 0
    return {
        "weights": dtype_bytes * weights_params(p, lay),
        "gradients": dtype_bytes * gradients,
        "gradients_fp32": FP32 * grads32,
        "master_weights": FP32 * master,
        "optimizer_states": 2 * FP32 * opt if on_gpu else 0,
    }
