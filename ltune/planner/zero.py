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

Adapter fine-tuning (LoRA, QLoRA): only trainable parameters reach the optimizer (the trainer's
param groups skip requires_grad False), and every state but the weights follows the optimizer:

- ZeRO 1-2 flatten only the optimizer's trainable parameters (stage_1_and_2.py
  `DeepSpeedZeroOptimizer.__init__`: `bit16_groups` keeps `is_optimized_parameter` ones, i.e.
  requires_grad and numel > 0; utils.py `is_optimized_parameter`): the flat partition, master copy,
  moments and gradients cover the adapters only; frozen weights stay whole on every rank.
- ZeRO-3 partitions every parameter, frozen ones too (parameter_offload.py
  `_convert_to_zero_parameters` over `module.parameters()`, persistence by size alone in
  `mark_persistent_parameters`), but its fp16/fp32 groups and `grad_partitions_flat_buffer` are
  built from `_get_trainable_parameter_groups` only (stage3.py).
- ZeRO-0: FP16_UnfusedOptimizer holds the optimizer's (trainable) parameters only; the gradient
  all-reduce skips requires_grad False (engine.py `_get_gradients_for_reduction`).
- QLoRA's 4-bit weights (bitsandbytes Params4bit, with their quantization constants) are frozen,
  outside every ZeRO partition, whole on every rank: ltune runs QLoRA at ZeRO 0-2 only.

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
    """How the parameters split over `num_gpus` ranks, in elements, for every ZeRO stage.

    `params` counts every parameter held in the model dtype, frozen and trainable (not QLoRA's
    4-bit weights: `quantized_bytes`); the optimizer's partitions cover `trainable_params` only."""

    num_gpus: int
    params: int  # model-dtype parameters, frozen and trainable (full fine-tuning: all of them, P)
    largest_leaf_params: int  # the biggest tensor (what the ZeRO-3 gather and a load handle at once)
    persistent_params: int  # tensors ZeRO-3 keeps whole on every rank (frozen or not)
    stage3_shard_params: int  # one rank's slice of the tensors ZeRO-3 splits
    stage3_optimizer_params: int  # one rank's ZeRO-3 optimizer partition (every trainable tensor split)
    flat_optimizer_params: int  # one rank's ZeRO 1-2 partition of the flattened trainable group
    trainable_params: int  # parameters the optimizer owns (T; = params for full fine-tuning)
    largest_trainable_params: int  # the biggest trainable tensor
    stage3_partition_params: int  # one rank's ZeRO-3 slice of every tensor (offload "all" keeps it in host memory)
    quantized_bytes: int = 0  # 4-bit weights with their constants, whole on every rank (QLoRA)

    @classmethod
    def of_shape(cls, s: Shape, num_gpus: int) -> "ParamPartition":
        """From the planner's aggregate numbers: T // N for the optimizer partitions; ZeRO-3's
        parameter slice is (P - persistent) // N, the persistent tensors counted whole beside it.
        Under LoRA/QLoRA the adapters (lora_A r x in, lora_B out x r per adapted linear layer,
        peft `LoraLayer.update_layer`) are tensors beside the base weights, in the model dtype;
        QLoRA's 4-bit weights leave the model-dtype count (all their tensors are taken to be over
        the persistence threshold: they only matter at ZeRO-3, which QLoRA does not run)."""
        trainable = s.optimized_params
        if not s.adapters:
            adapter_tensors, largest_trainable = [], s.largest_leaf_params
        else:
            adapter_tensors = [s.lora_rank * n for fan_in, fan_out in s.adapter_modules for n in (fan_in, fan_out)]
            largest_trainable = max(adapter_tensors, default=0)
        params = s.stored_params - s.quantized_params
        small_adapters = sum(n for n in adapter_tensors if n <= STAGE3_PARAM_PERSISTENCE_THRESHOLD)
        persistent = s.persistent_params + s.num_layers * small_adapters
        return cls(
            num_gpus=num_gpus,
            params=params,
            largest_leaf_params=s.largest_leaf_params,
            persistent_params=persistent,
            stage3_shard_params=(params - persistent) // num_gpus,
            stage3_optimizer_params=trainable // num_gpus,
            flat_optimizer_params=trainable // num_gpus,
            trainable_params=trainable,
            largest_trainable_params=largest_trainable,
            stage3_partition_params=params // num_gpus,
            quantized_bytes=s.quantized_bytes,
        )

    @classmethod
    def of_tensors(
        cls, param_numels: list[int], num_gpus: int, trainable: list[bool] | None = None, quantized_bytes: int = 0
    ) -> "ParamPartition":
        """From the element count of every model-dtype parameter tensor (and, parallel to it,
        whether it trains; None: all of them), as DeepSpeed splits them: ZeRO-3 ceil(n / N) per
        tensor, whole at or below the persistence threshold; ZeRO 1-2 ceil(T / N) of the trainable ones."""
        if trainable is None:
            trainable = [True] * len(param_numels)
        if len(trainable) != len(param_numels):
            raise ValueError(f"trainable has {len(trainable)} entries, param_numels {len(param_numels)}")
        trained = [n for n, t in zip(param_numels, trainable) if t]
        params = sum(param_numels)
        persistent = [n for n in param_numels if n <= STAGE3_PARAM_PERSISTENCE_THRESHOLD]
        split = [n for n in param_numels if n > STAGE3_PARAM_PERSISTENCE_THRESHOLD]
        return cls(
            num_gpus=num_gpus,
            params=params,
            largest_leaf_params=max(param_numels),
            persistent_params=sum(persistent),
            stage3_shard_params=sum(_ceil_div(n, num_gpus) for n in split),
            stage3_optimizer_params=sum(_ceil_div(n, num_gpus) for n in trained),
            flat_optimizer_params=_ceil_div(sum(trained), num_gpus),
            trainable_params=sum(trained),
            largest_trainable_params=max(trained, default=0),
            stage3_partition_params=sum(_ceil_div(n, num_gpus) for n in param_numels),
            quantized_bytes=quantized_bytes,
        )


def weights_params(p: ParamPartition, lay: Layout) -> int:
    """Model-dtype parameter elements on one rank's GPU, frozen ones included: whole under ZeRO 0-2
    (stage_1_and_2.py partitions the optimizer's group only); under ZeRO-3 the persistent tensors
    and the rank's slice, the slice in host memory with offload "all" (parameter_offload.py)."""
    if lay.zero_stage < 3:
        return p.params
    if lay.offload == "all":
        return p.persistent_params
    return p.persistent_params + p.stage3_shard_params


def optimizer_params(p: ParamPartition, zero_stage: int) -> int:
    """Elements of one rank's optimizer partition (master copy, moments, fp32 gradients), over the
    trainable parameters only: whole at ZeRO-0, the flat partition at ZeRO 1-2, the per-tensor
    slices at ZeRO-3 (stage3.py `_create_fp32_partitions` over `trainable_param_groups`)."""
    if zero_stage == 0:
        return p.trainable_params
    if zero_stage < 3:
        return p.flat_optimizer_params
    return p.stage3_optimizer_params


def model_state_bytes(p: ParamPartition, dtype_bytes: int, lay: Layout, precision: str, phase: str) -> dict[str, int]:
    """One rank's model states on the GPU during `phase` by term name (bytes); fp32 gradients
    exist at the "step" phase only; gradients and optimizer states of trainable parameters only,
    QLoRA's 4-bit weights whole in "weights" (see the module docstring for the rule's sources)."""
    stage, on_gpu = lay.zero_stage, lay.offload == "none"
    wrapper = optimizer_wrapper(stage, precision)
    opt = optimizer_params(p, stage)
    if stage <= 1:
        gradients = p.trainable_params
    else:
        gradients = opt if on_gpu else 0
    grads32 = 0
    if phase == "step" and on_gpu and wrapper != OptimizerWrapper.BARE:
        grads32 = opt if stage < 3 else min(opt, SUB_GROUP_SIZE + p.largest_trainable_params // p.num_gpus)
    master = opt if on_gpu and wrapper != OptimizerWrapper.BARE else 0
    return {
        "weights": dtype_bytes * weights_params(p, lay) + p.quantized_bytes,
        "gradients": dtype_bytes * gradients,
        "gradients_fp32": FP32 * grads32,
        "master_weights": FP32 * master,
        "optimizer_states": 2 * FP32 * opt if on_gpu else 0,
    }
