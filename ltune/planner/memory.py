"""Per-GPU memory of one training step, one function per term.

Every term is in bytes. A step has three moments whose live memory differs, and the
peak is the largest of them (terms that never coexist are not added):

- `loss`: end of the forward, while the loss and its backward run (logits live);
- `backward`: a decoder layer's backward (with full recompute, its forward is re-run), or the
  input embedding's at the end of it when that is larger;
- `step`: the optimizer step (activations freed, fp32 gradients live).

Conventions: P parameters, N = num_gpus (ZeRO shards over every rank, data- and
sequence-parallel alike, as DeepSpeed-Ulysses does), t tokens per rank per
micro-batch (micro_batch_size * seq_len / sp_degree), d bytes per element of the model
dtype (2 in bf16 and fp16, 4 in fp32).
"""

from __future__ import annotations

from ..profiles.schema import GpuProfile, ModelProfile
from .activations import (
    activation_checkpoints_bytes,
    activation_working_bytes,
    embedding_backward_bytes,
    final_norm_bytes,
    logits_loss_bytes,
    shared_layer_inputs_bytes,
    tied_output_grad_bytes,
)
from .schema import Layout, MemoryBreakdown
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

#: fraction of the allocated peak the caching allocator holds beyond it (reserved minus
#: allocated); an assumption until measured on a GPU (see bench/results/).
FRAGMENTATION_FRACTION = 0.05
#: default safety margin: plans must fit in (1 - margin) of the GPU's memory.
SAFETY_MARGIN = 0.05


# ---------------------------------------------------------------- model states
# DeepSpeed mixed precision keeps 16-bit params and grads plus an fp32 master copy and
# two fp32 Adam moments (ZeRO paper, Rajbhandari et al. 2020: 2 + 2 + 12 bytes/param).
# In fp32 the params and grads take 4 bytes each; ZeRO 1-3 still clone an fp32 master
# partition (stage_1_and_2.py `single_partition_of_fp32_groups`, stage3.py
# `_create_fp32_partitions`), ZeRO-0 runs the bare optimizer on the parameters.


def weights_bytes(s: Shape, lay: Layout) -> int:
    """Parameters in the model dtype: whole under ZeRO 0-2, a 1/N partition under ZeRO-3 (stage3.py)."""
    d = s.dtype_bytes
    if lay.zero_stage < 3:
        return d * s.params
    if lay.offload == "all":
        return d * s.persistent_params  # partitions live in host memory
    return d * (s.params // lay.num_gpus + s.persistent_params)


def gradients_bytes(s: Shape, lay: Layout) -> int:
    """Gradients in the model dtype: whole for ZeRO 0-1, a 1/N partition for ZeRO 2-3.

    ZeRO-3 keeps `grad_partitions_flat_buffer` in the model dtype; with optimizer offload
    it is pinned host memory (stage3.py).
    """
    d = s.dtype_bytes
    if lay.zero_stage <= 1:
        return d * s.params
    if lay.offload != "none":
        return 0
    return d * (s.params // lay.num_gpus)


def gradients_fp32_bytes(s: Shape, lay: Layout, phase: str) -> int:
    """fp32 gradients for the optimizer, made at the step.

    ZeRO 1-2 upcast their gradient partition (stage_1_and_2.py
    `single_partition_of_fp32_groups[i].grad`); ZeRO-3 one sub-group at a time (stage3.py
    `_prepare_fp32_grad_for_sub_group`); ZeRO-0 in 16-bit (FP16_UnfusedOptimizer) every
    parameter's (unfused_optimizer.py `fp32_param.grad`). Plain fp32 at ZeRO-0 steps on
    the parameters' own gradients.
    """
    if phase != "step" or lay.offload != "none":
        return 0
    if lay.zero_stage == 0:
        return FP32 * s.params if _zero0_optimizer(s, lay) == "unfused" else 0
    part = s.params // lay.num_gpus
    if lay.zero_stage == 3:
        return FP32 * min(part, SUB_GROUP_SIZE + s.largest_leaf_params // lay.num_gpus)
    return FP32 * part


def master_weights_bytes(s: Shape, lay: Layout) -> int:
    """fp32 master copy: partitioned for ZeRO >= 1, whole for ZeRO-0 in 16-bit, none for
    plain fp32 at ZeRO-0; host memory when offloaded."""
    if lay.offload != "none":
        return 0
    wrapper = _zero0_optimizer(s, lay)
    if wrapper == "none":
        return 0
    if wrapper == "unfused":
        return FP32 * s.params
    return FP32 * (s.params // lay.num_gpus)


def optimizer_states_bytes(s: Shape, lay: Layout) -> int:
    """AdamW's two fp32 moments, partitioned for ZeRO >= 1, whole at ZeRO-0."""
    if lay.offload != "none":
        return 0
    if lay.zero_stage == 0:
        return 2 * FP32 * s.params
    return 2 * FP32 * (s.params // lay.num_gpus)


def _zero0_optimizer(s: Shape, lay: Layout) -> str | None:
    """DeepSpeed's wrapper around the trainer's torch AdamW at ZeRO-0 (engine.py
    `_do_optimizer_sanity_check`, grad_accum_dtype left at the model dtype): bf16 and fp16
    get FP16_UnfusedOptimizer ("unfused": whole fp32 master copy, 16-bit gradients kept);
    fp32 the bare optimizer ("none"). BF16_Optimizer is only chosen at ZeRO-1 with fp32
    gradient accumulation, which ltune does not configure. None at ZeRO >= 1."""
    if lay.zero_stage != 0:
        return None
    return "none" if s.precision == "fp32" else "unfused"


# ---------------------------------------------------------------- ZeRO buffers


def zero_buffers_bytes(s: Shape, lay: Layout, phase: str) -> int:
    """DeepSpeed's working buffers at its defaults.

    ZeRO 1-2: the contiguous reduce (ipg) bucket of reduce_bucket_size elements (model dtype),
    during backward (stage_1_and_2.py). ZeRO-3: the ipg bucket allocated at init
    (stage3.py), plus, outside the step, the gathered parameters of the module in use and
    the prefetched next one (capped by stage3_max_live_parameters) and that module's
    whole gradient before its reduce-scatter (cf. DeepSpeed's
    `estimate_zero3_model_states_mem_needs`: 4 bytes x largest layer).
    """
    d = s.dtype_bytes
    if lay.zero_stage in (1, 2):
        return 0 if phase == "step" else d * min(REDUCE_BUCKET_SIZE, s.params)
    if lay.zero_stage != 3:
        return 0
    ipg = d * REDUCE_BUCKET_SIZE
    if phase == "step" or lay.num_gpus == 1 and lay.offload != "all":
        return ipg  # one rank holds whole parameters: nothing to gather
    gathered = min(
        STAGE3_MAX_LIVE_PARAMETERS,
        s.largest_leaf_params + min(STAGE3_PREFETCH_BUCKET_SIZE, s.layer_params),
    )
    return ipg + d * (gathered + s.largest_leaf_params)


def allreduce_bucket_bytes(s: Shape, lay: Layout) -> int:
    """ZeRO-0's gradient all-reduce after the backward: gradients flattened into buckets of
    500M elements in the model dtype (engine.py `allreduce_gradients`,
    MEMORY_OPT_ALLREDUCE_SIZE); a bucket closes after the tensor that crosses the limit."""
    if lay.zero_stage != 0 or lay.num_gpus == 1:
        return 0
    return s.dtype_bytes * min(s.params, ALLREDUCE_BUCKET_SIZE + s.largest_leaf_params)


# ---------------------------------------------------------------- runtime reserve


def cuda_context_bytes(gpu: GpuProfile) -> int:
    """CUDA context, kernels and cuBLAS workspace (PyTorch PR #86509: ~290 MB lazy)."""
    return gpu.cuda_context_bytes


def comm_buffers_bytes(gpu: GpuProfile, lay: Layout) -> int:
    """NCCL communicator buffers: one data-parallel group, plus a sequence-parallel one
    when sp_degree > 1 (nccl issue #864 reports hundreds of MB per communicator)."""
    if lay.num_gpus == 1:
        return 0
    groups = 1 + (lay.sp_degree > 1)
    return groups * gpu.comm_buffer_bytes


def fragmentation_bytes(allocated_bytes: int) -> int:
    """The caching allocator's reserved-but-free share (FRAGMENTATION_FRACTION)."""
    return int(FRAGMENTATION_FRACTION * allocated_bytes)


# ---------------------------------------------------------------- host memory


def host_offload_bytes_per_gpu(s: Shape, lay: Layout) -> int:
    """Host memory an offloading rank uses: fp32 master, moments and gradients (16
    bytes/param of its partition), plus the model-dtype parameter and gradient partitions
    (ZeRO-Offload, Ren et al. 2021)."""
    if lay.offload == "none":
        return 0
    part = s.params // lay.num_gpus
    host = 4 * FP32 * part + s.dtype_bytes * part  # fp32 master, 2 moments, fp32 grads; grads
    if lay.offload == "all":
        host += s.dtype_bytes * part
    return host


# ---------------------------------------------------------------- the whole breakdown

PHASES = ("loss", "backward", "step")


STATE_TERMS = ("weights", "gradients", "gradients_fp32", "master_weights", "optimizer_states", "zero_buffers")
ACTIVATION_TERMS = ("activations_checkpoints", "activations_layer", "logits_loss")


def state_terms(s: Shape, lay: Layout, phase: str) -> dict[str, int]:
    """Model states and ZeRO buffers: depend on the GPU count, ZeRO stage and offload only.

    At ZeRO-0 the `step` moment is the larger of the gradient all-reduce (its bucket) and
    the optimizer step (its fp32 gradients), which follow each other."""
    terms = {
        "weights": weights_bytes(s, lay),
        "gradients": gradients_bytes(s, lay),
        "gradients_fp32": gradients_fp32_bytes(s, lay, phase),
        "master_weights": master_weights_bytes(s, lay),
        "optimizer_states": optimizer_states_bytes(s, lay),
        "zero_buffers": zero_buffers_bytes(s, lay, phase),
    }
    bucket = allreduce_bucket_bytes(s, lay) if phase == "step" else 0
    if bucket > terms["gradients_fp32"]:
        terms["gradients_fp32"], terms["zero_buffers"] = 0, bucket
    return terms


def activation_terms(s: Shape, lay: Layout, phase: str) -> dict[str, int]:
    """Activations, logits and loss: depend on sp degree, micro-batch, recompute, loss
    and attention only (the optimizer step holds none)."""
    terms = dict.fromkeys(ACTIVATION_TERMS, 0)
    shared = shared_layer_inputs_bytes(s, lay)
    if phase == "loss":
        terms["activations_checkpoints"] = activation_checkpoints_bytes(s, lay) + final_norm_bytes(s, lay) + shared
        terms["logits_loss"] = logits_loss_bytes(s, lay)
    elif phase == "backward":
        checkpoints = activation_checkpoints_bytes(s, lay) + shared
        layer = activation_working_bytes(s, lay)
        embedding = embedding_backward_bytes(s)
        if embedding > checkpoints + layer:  # the backward's last op: every layer's saved tensors are freed
            checkpoints, layer = 0, embedding
        terms["activations_checkpoints"] = checkpoints
        terms["activations_layer"] = layer
        terms["logits_loss"] = tied_output_grad_bytes(s)
    return terms


def reserve_terms(gpu: GpuProfile, lay: Layout, allocated_bytes: int) -> dict[str, int]:
    """The runtime reserve beside what tensors take."""
    return {
        "cuda_context": cuda_context_bytes(gpu),
        "comm_buffers": comm_buffers_bytes(gpu, lay),
        "fragmentation": fragmentation_bytes(allocated_bytes),
    }


def phase_terms(s: Shape, lay: Layout, gpu: GpuProfile, phase: str) -> dict[str, int]:
    """Every term live at one moment of the step, by name."""
    terms = state_terms(s, lay, phase) | activation_terms(s, lay, phase)
    return terms | reserve_terms(gpu, lay, sum(terms.values()))


def peak_terms(s: Shape, lay: Layout, gpu: GpuProfile) -> tuple[str, dict[str, int]]:
    """The moment with the most live memory and its terms."""
    best: tuple[str, dict[str, int]] | None = None
    best_total = -1
    for phase in PHASES:
        terms = phase_terms(s, lay, gpu, phase)
        total = sum(terms.values())
        if total > best_total:
            best, best_total = (phase, terms), total
    assert best is not None
    return best


def estimate_memory(
    model: ModelProfile,
    gpu: GpuProfile,
    layout: Layout,
    seq_len: int,
    *,
    precision: str = "bf16",
    chunk_tokens: int = 4096,
    safety_margin: float = SAFETY_MARGIN,
    host_mem_bytes: int | None = None,
    shape: Shape | None = None,
) -> MemoryBreakdown:
    """The per-GPU breakdown at the step's peak moment, and the host check."""
    s = shape or Shape.of(model, seq_len, precision, chunk_tokens)
    phase, terms = peak_terms(s, layout, gpu)
    per_node = min(layout.num_gpus, gpu.gpus_per_node)
    return MemoryBreakdown(
        terms=terms,
        total_bytes=sum(terms.values()),
        capacity_bytes=gpu.hbm_bytes,
        usable_bytes=int(gpu.hbm_bytes * (1 - safety_margin)),
        host_bytes_per_node=host_offload_bytes_per_gpu(s, layout) * per_node,
        host_capacity_bytes_per_node=gpu.host_mem_bytes_per_node if host_mem_bytes is None else host_mem_bytes,
        peak_phase=phase,
    )
