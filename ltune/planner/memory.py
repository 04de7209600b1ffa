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
    moe_loss_bytes,
    aux_loss_grad_bytes,
    activation_checkpoints_bytes,
    activation_working_bytes,
    embedding_backward_bytes,
    final_norm_bytes,
    logits_loss_bytes,
    lora_checkpoints_bytes,
    lora_final_norm_bytes,
    lora_working_bytes,
    shared_layer_inputs_bytes,
    tied_output_grad_bytes,
)
from .schema import Layout, MemoryBreakdown, Method
from .shape import FP32, Shape
from .zero import (
    ALLREDUCE_BUCKET_SIZE,
    REDUCE_BUCKET_SIZE,
    STAGE3_MAX_LIVE_PARAMETERS,
    STAGE3_PREFETCH_BUCKET_SIZE,
    ParamPartition,
    model_state_bytes,
    optimizer_params,
)

# DeepSpeed's ZeRO settings are defined in zero.py; these are re-exported for the ds_config writer.

#: fraction of the allocated peak the caching allocator holds beyond it (reserved minus
#: allocated); an assumption until measured on a GPU (see bench/results/).
FRAGMENTATION_FRACTION = 0.05
#: default safety margin: plans must fit in (1 - margin) of the GPU's memory.
SAFETY_MARGIN = 0.05


# ---------------------------------------------------------------- model states
# ZeRO's rule (which states a rank holds, by stage, offload and precision) lives in zero.py;
# the planner applies it to its aggregate numbers (P // N per partition).


def model_states(s: Shape, lay: Layout, phase: str) -> dict[str, int]:
    """The five model-state terms of one rank in `phase` (zero.model_state_bytes on the Shape;
    adapters and 4-bit weights as zero.py's docstring cites DeepSpeed, peft and bitsandbytes)."""
    return model_state_bytes(ParamPartition.of_shape(s, lay.num_gpus), s.dtype_bytes, lay, s.precision, phase)


def weights_bytes(s: Shape, lay: Layout) -> int:
    """Parameters in the model dtype, frozen ones too: whole under ZeRO 0-2, a 1/N partition under
    ZeRO-3 (stage3.py); plus QLoRA's 4-bit weights and constants, whole (bitsandbytes quantize_4bit)."""
    return model_states(s, lay, "backward")["weights"]


def gradients_bytes(s: Shape, lay: Layout) -> int:
    """Gradients in the model dtype, of trainable parameters only: whole for ZeRO 0-1, a 1/N
    partition for ZeRO 2-3 (in host memory when offloaded)."""
    return model_states(s, lay, "backward")["gradients"]


def gradients_fp32_bytes(s: Shape, lay: Layout, phase: str) -> int:
    """fp32 gradients of the trainable parameters, made at the step (none for plain fp32 at ZeRO-0)."""
    return model_states(s, lay, phase)["gradients_fp32"]


def master_weights_bytes(s: Shape, lay: Layout) -> int:
    """fp32 master copy of the trainable parameters: partitioned for ZeRO >= 1, whole for ZeRO-0
    in 16-bit, none for plain fp32 at ZeRO-0; host memory when offloaded."""
    return model_states(s, lay, "backward")["master_weights"]


def optimizer_states_bytes(s: Shape, lay: Layout) -> int:
    """AdamW's two fp32 moments of the trainable parameters, partitioned for ZeRO >= 1, whole at ZeRO-0."""
    return model_states(s, lay, "backward")["optimizer_states"]


# ---------------------------------------------------------------- ZeRO buffers


def zero_buffers_bytes(s: Shape, lay: Layout, phase: str) -> int:
    """DeepSpeed's working buffers at its defaults.

    ZeRO 1-2: the contiguous reduce (ipg) bucket of reduce_bucket_size elements (model dtype),
    during backward (stage_1_and_2.py `setup_buckets`: `torch.empty(reduce_bucket_size)` however
    few parameters train, so an adapter run holds all of it; full fine-tuning keeps the older
    min(bucket, P), which differs below 500M parameters only). ZeRO-3: the ipg bucket allocated
    at init (stage3.py `_setup_for_real_optimizer`, reduce_bucket_size whatever trains), plus,
    outside the step, the gathered parameters of the module in use and the prefetched next one
    (frozen weights are gathered too; capped by stage3_max_live_parameters) and that module's
    whole gradient before its reduce-scatter, of its trainable tensors only (cf. DeepSpeed's
    `estimate_zero3_model_states_mem_needs`: 4 bytes x largest layer).
    """
    d = s.dtype_bytes
    p = ParamPartition.of_shape(s, lay.num_gpus)
    if lay.zero_stage in (1, 2):
        bucket = min(REDUCE_BUCKET_SIZE, p.params) if p.trainable_params == p.params else REDUCE_BUCKET_SIZE
        return 0 if phase == "step" else d * bucket
    if lay.zero_stage != 3:
        return 0
    ipg = d * REDUCE_BUCKET_SIZE
    if phase == "step" or lay.num_gpus == 1 and lay.offload != "all":
        return ipg  # one rank holds whole parameters: nothing to gather
    layer = s.layer_params + (s.trainable_params // s.num_layers if s.adapters else 0)
    if s.is_moe:
        return ipg + d * moe_zero3_gather_params(s, p, layer)
    gathered = min(
        STAGE3_MAX_LIVE_PARAMETERS,
        p.largest_leaf_params + min(STAGE3_PREFETCH_BUCKET_SIZE, layer),
    )
    return ipg + d * (gathered + p.largest_trainable_params)


def moe_zero3_gather_params(s: Shape, p: ParamPartition, layer_params: int) -> int:
    """A MoE model's ZeRO-3 gathers, in elements: the trainer makes each sparse MoE block a leaf
    module (deepspeed.utils.set_z3_leaf_modules; trainer/model.py), whose parameters -- router,
    routed and shared experts -- are fetched at once however many that is (stage3_max_live_parameters
    bounds the prefetch, not one module's fetch: partitioned_param_coordinator.py `fetch_sub_module`),
    beside the prefetched next module; and the block's whole gradient before its reduce-scatter
    (its trainable part: none under adapters, which take attention layers only)."""
    block = max(p.largest_leaf_params, s.moe_block_params)
    gathered = max(block, min(STAGE3_MAX_LIVE_PARAMETERS, block + min(STAGE3_PREFETCH_BUCKET_SIZE, layer_params)))
    gradient = p.largest_trainable_params if s.adapters else block
    return gathered + gradient


def allreduce_bucket_bytes(s: Shape, lay: Layout) -> int:
    """ZeRO-0's gradient all-reduce after the backward: the trainable parameters' gradients
    (engine.py `_get_gradients_for_reduction` skips requires_grad False) flattened into buckets of
    500M elements in the model dtype (engine.py `allreduce_gradients`, `allreduce_no_retain`,
    MEMORY_OPT_ALLREDUCE_SIZE); a bucket closes after the tensor that crosses the limit."""
    if lay.zero_stage != 0 or lay.num_gpus == 1:
        return 0
    p = ParamPartition.of_shape(s, lay.num_gpus)
    return s.dtype_bytes * min(p.trainable_params, ALLREDUCE_BUCKET_SIZE + p.largest_trainable_params)


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
    bytes/param of its optimizer partition: trainable parameters only) and the model-dtype
    gradient partition, plus with offload "all" the ZeRO-3 partition of every parameter, frozen
    ones too (ZeRO-Offload, Ren et al. 2021; stage3.py, parameter_offload.py)."""
    if lay.offload == "none":
        return 0
    p = ParamPartition.of_shape(s, lay.num_gpus)
    part = optimizer_params(p, lay.zero_stage)
    host = 4 * FP32 * part + s.dtype_bytes * part  # fp32 master, 2 moments, fp32 grads; grads
    if lay.offload == "all":
        host += s.dtype_bytes * p.stage3_partition_params
    return host


#: int64 arrays of a packed sample: input_ids, labels, position_ids (trainer/packing.py `sample`)
SAMPLE_ARRAYS = 3
INT64 = 8


def host_build_bytes_per_gpu(s: Shape, lay: Layout) -> int:
    """The model build's transient host memory on one rank (trainer/model.py). ZeRO 0-2, the
    larger of a random init (fp32 tensors awaiting their parent's init: the embedding and one
    decoder layer) and a load (one tensor read, at most the largest, and its cast copy; the
    checkpoint dtype taken as the model's). ZeRO-3: none (partitions are made and initialised
    on the device; rank 0's one loaded tensor is host_rank0_bytes'). LoRA/QLoRA: the same (the
    base model is built or loaded as for full fine-tuning; QLoRA is assumed to quantize each
    weight on the GPU as it is moved there, one tensor at a time, so the host holds no more than
    one model-dtype tensor and its copy; the adapters are small)."""
    if lay.zero_stage == 3:
        return 0
    random_init = FP32 * (s.vocab_size * s.hidden_size + s.layer_params)
    load = 2 * s.dtype_bytes * s.largest_leaf_params
    return max(random_init, load)


def host_rank0_bytes(s: Shape, lay: Layout) -> int:
    """Rank 0's own host buffer: one tensor in the model dtype, the largest, as the export
    (trainer/export.py) gathers and writes them one at a time and, under ZeRO-3, as the load
    reads them (model.py `_load_safetensors_zero3`)."""
    return s.dtype_bytes * s.largest_leaf_params


def host_data_bytes_per_gpu(s: Shape, lay: Layout) -> int:
    """A rank's resident data: one micro-batch's packed samples and their stacked copy
    (packing.py `sample`, `collate`), int64. The token files are memory-mapped (page cache,
    shared by the node's ranks, not counted); the packing index grows with the dataset, which
    the plan does not know (not counted)."""
    return 2 * SAMPLE_ARRAYS * INT64 * lay.micro_batch_size * s.seq_len


def host_bytes_per_node(s: Shape, lay: Layout, gpus_per_node: int) -> int:
    """Host memory of the busiest node (rank 0's): every rank's data, plus the larger of the
    build (before DeepSpeed allocates the offloaded states) and the offloaded states with rank
    0's export buffer. No other pinned buffers: the offloaded states are DeepSpeed's pinned
    memory and batches are copied from pageable arrays (loop.py)."""
    ranks = min(lay.num_gpus, gpus_per_node)
    build = ranks * host_build_bytes_per_gpu(s, lay) + (host_rank0_bytes(s, lay) if lay.zero_stage == 3 else 0)
    train = ranks * host_offload_bytes_per_gpu(s, lay) + host_rank0_bytes(s, lay)
    return ranks * host_data_bytes_per_gpu(s, lay) + max(build, train)


# ---------------------------------------------------------------- the whole breakdown

PHASES = ("loss", "backward", "step")


STATE_TERMS = ("weights", "gradients", "gradients_fp32", "master_weights", "optimizer_states", "zero_buffers")
ACTIVATION_TERMS = ("activations_checkpoints", "activations_layer", "logits_loss")


def state_terms(s: Shape, lay: Layout, phase: str) -> dict[str, int]:
    """Model states and ZeRO buffers: depend on the GPU count, ZeRO stage and offload only.

    At ZeRO-0 the `step` moment is the larger of the gradient all-reduce (its bucket) and
    the optimizer step (its fp32 gradients), which follow each other."""
    terms = model_states(s, lay, phase) | {"zero_buffers": zero_buffers_bytes(s, lay, phase)}
    bucket = allreduce_bucket_bytes(s, lay) if phase == "step" else 0
    if bucket > terms["gradients_fp32"]:
        terms["gradients_fp32"], terms["zero_buffers"] = 0, bucket
    return terms


def activation_terms(s: Shape, lay: Layout, phase: str) -> dict[str, int]:
    """Activations, logits and loss: depend on sp degree, micro-batch, recompute, loss
    and attention only (the optimizer step holds none)."""
    terms = dict.fromkeys(ACTIVATION_TERMS, 0)
    shared = shared_layer_inputs_bytes(s, lay)
    if s.adapters:
        return lora_activation_terms(s, lay, phase, terms, shared)
    if phase == "loss":
        terms["activations_checkpoints"] = activation_checkpoints_bytes(s, lay) + final_norm_bytes(s, lay) + shared
        terms["logits_loss"] = moe_loss_bytes(s, lay) if s.is_moe else logits_loss_bytes(s, lay)
    elif phase == "backward":
        checkpoints = activation_checkpoints_bytes(s, lay) + shared + aux_loss_grad_bytes(s, lay)
        layer = activation_working_bytes(s, lay)
        embedding = embedding_backward_bytes(s)
        if embedding > checkpoints + layer:  # the backward's last op: every layer's saved tensors are freed
            checkpoints, layer = 0, embedding
        terms["activations_checkpoints"] = checkpoints
        terms["activations_layer"] = layer
        terms["logits_loss"] = tied_output_grad_bytes(s)
    return terms


def lora_activation_terms(s: Shape, lay: Layout, phase: str, terms: dict[str, int], shared: int) -> dict[str, int]:
    """`activation_terms` under LoRA/QLoRA (activations.py's lora_* terms): the frozen embedding
    and output layer make no weight gradient, so nothing waits for or ends in the embedding's
    backward."""
    if phase == "loss":
        terms["activations_checkpoints"] = lora_checkpoints_bytes(s, lay) + lora_final_norm_bytes(s, lay) + shared
        terms["logits_loss"] = logits_loss_bytes(s, lay)
    elif phase == "backward":
        terms["activations_checkpoints"] = lora_checkpoints_bytes(s, lay) + shared
        terms["activations_layer"] = lora_working_bytes(s, lay)
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
    loss_chunk_tokens: int = 4096,
    safety_margin: float = SAFETY_MARGIN,
    host_mem_bytes_per_node: int | None = None,
    shape: Shape | None = None,
    method: Method | None = None,
) -> MemoryBreakdown:
    """The per-GPU breakdown at the step's peak moment, and the host check (`method`: what
    trains, full fine-tuning when not given; a given `shape` carries its own)."""
    s = shape or Shape.of(model, seq_len, precision, loss_chunk_tokens, sdpa_math=not gpu.supports_bf16, method=method)
    phase, terms = peak_terms(s, layout, gpu)
    return MemoryBreakdown(
        terms=terms,
        total_bytes=sum(terms.values()),
        capacity_bytes=gpu.hbm_bytes,
        usable_bytes=int(gpu.hbm_bytes * (1 - safety_margin)),
        host_bytes_per_node=host_bytes_per_node(s, layout, gpu.gpus_per_node),
        host_capacity_bytes_per_node=(
            gpu.host_mem_bytes_per_node if host_mem_bytes_per_node is None else host_mem_bytes_per_node
        ),
        peak_phase=phase,
    )
