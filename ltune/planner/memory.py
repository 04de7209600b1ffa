"""Per-GPU memory of one training step, one function per term.

Every term is in bytes. A step has three moments whose live memory differs, and the
peak is the largest of them (terms that never coexist are not added):

- `loss`: end of the forward, while the loss and its backward run (logits live);
- `backward`: a decoder layer's backward (with full recompute, its forward is re-run);
- `step`: the optimizer step (activations freed, fp32 gradients live).

Conventions: P parameters, N = num_gpus (ZeRO shards over every rank, data- and
sequence-parallel alike, as DeepSpeed-Ulysses does), t tokens per rank per
micro-batch (micro_batch_size * seq_len / sp_degree), 16-bit activations.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..profiles.schema import GpuProfile, ModelProfile
from .schema import Layout, MemoryBreakdown

# DeepSpeed ZeRO defaults (deepspeed/runtime/zero/config.py), in elements; ltune writes
# them explicitly into ds_config.json so the plan and the job agree.
REDUCE_BUCKET_SIZE = 500_000_000
ALLGATHER_BUCKET_SIZE = 500_000_000
STAGE3_PREFETCH_BUCKET_SIZE = 50_000_000
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000
STAGE3_PARAM_PERSISTENCE_THRESHOLD = 100_000
SUB_GROUP_SIZE = 1_000_000_000

HALF = 2  # bytes of a bf16/fp16 element
FP32 = 4

#: fraction of the allocated peak the caching allocator holds beyond it (reserved minus
#: allocated); an assumption until measured on a GPU (see bench/results/).
FRAGMENTATION_FRACTION = 0.05
#: default safety margin: plans must fit in (1 - margin) of the GPU's memory.
SAFETY_MARGIN = 0.05


@dataclass(frozen=True, slots=True)
class Shape:
    """Layout-independent numbers of one (model, seq_len) pair, computed once per plan."""

    params: int
    layers: int
    hidden: int
    q_size: int
    kv_size: int
    heads: int
    ffn: int
    vocab: int
    tied: bool
    largest_leaf_params: int  # biggest module ZeRO-3 gathers at once
    layer_params: int
    persistent_params: int  # tensors at or below stage3_param_persistence_threshold
    seq_len: int
    precision: str = "bf16"
    chunk_tokens: int = 4096

    @classmethod
    def of(cls, model: ModelProfile, seq_len: int, precision: str = "bf16", chunk_tokens: int = 4096) -> "Shape":
        h = model.hidden_size
        persistent = (2 * model.num_layers + 1) * h  # RMSNorm weights
        if model.attention_bias:
            persistent += model.num_layers * (model.q_size + 2 * model.kv_size)
        return cls(
            params=model.num_params(),
            layers=model.num_layers,
            hidden=h,
            q_size=model.q_size,
            kv_size=model.kv_size,
            heads=model.num_attention_heads,
            ffn=model.intermediate_size,
            vocab=model.vocab_size,
            tied=model.tie_word_embeddings,
            largest_leaf_params=model.largest_tensor_params(),
            layer_params=model.layer_params(),
            persistent_params=persistent,
            seq_len=seq_len,
            precision=precision,
            chunk_tokens=chunk_tokens,
        )


def tokens_per_rank(shape: Shape, layout: Layout) -> int:
    """Ulysses splits each sequence over sp_degree ranks (Jacobs et al. 2023, DeepSpeed-Ulysses)."""
    return layout.micro_batch_size * -(-shape.seq_len // layout.sp_degree)


# ---------------------------------------------------------------- model states
# DeepSpeed mixed precision keeps 16-bit params and grads plus an fp32 master copy and
# two fp32 Adam moments (ZeRO paper, Rajbhandari et al. 2020: 2 + 2 + 12 bytes/param).


def weights_bytes(s: Shape, lay: Layout) -> int:
    """16-bit parameters: whole under ZeRO 0-2, a 1/N partition under ZeRO-3 (stage3.py)."""
    if lay.zero_stage < 3:
        return HALF * s.params
    if lay.offload == "all":
        return HALF * s.persistent_params  # partitions live in host memory
    return HALF * (s.params // lay.num_gpus + s.persistent_params)


def gradients_bytes(s: Shape, lay: Layout) -> int:
    """16-bit gradients: whole for ZeRO 0-1, a 1/N partition for ZeRO 2-3.

    ZeRO-0 in bf16 runs DeepSpeed's BF16_Optimizer, which accumulates in fp32 instead
    (see gradients_fp32_bytes). ZeRO-3 keeps `grad_partitions_flat_buffer` in the model
    dtype; with optimizer offload it is pinned host memory (stage3.py).
    """
    if lay.zero_stage == 0:
        return HALF * s.params if _fp16_optimizer(s, lay) else 0
    if lay.zero_stage == 1:
        return HALF * s.params
    if lay.offload != "none":
        return 0
    return HALF * (s.params // lay.num_gpus)


def gradients_fp32_bytes(s: Shape, lay: Layout, phase: str) -> int:
    """fp32 gradients for the optimizer.

    BF16_Optimizer (ZeRO-0, bf16) holds a whole fp32 gradient buffer all step long
    (bf16_optimizer.py `fp32_groups_gradients_flat`). ZeRO 1-2 upcast their gradient
    partition at the step (stage_1_and_2.py `single_partition_of_fp32_groups[i].grad`);
    ZeRO-3 upcasts one sub-group at a time (stage3.py `_prepare_fp32_grad_for_sub_group`);
    FP16_Optimizer (ZeRO-0, fp16) upcasts the whole flat gradient at the step.
    """
    if lay.zero_stage == 0:
        if not _fp16_optimizer(s, lay):
            return FP32 * s.params
        return FP32 * s.params if phase == "step" else 0
    if phase != "step" or lay.offload != "none":
        return 0
    part = s.params // lay.num_gpus
    if lay.zero_stage == 3:
        return FP32 * min(part, SUB_GROUP_SIZE + s.largest_leaf_params // lay.num_gpus)
    return FP32 * part


def master_weights_bytes(s: Shape, lay: Layout) -> int:
    """fp32 master copy: partitioned for ZeRO >= 1 and for BF16_Optimizer; host memory when offloaded."""
    if lay.offload != "none":
        return 0
    if _fp16_optimizer(s, lay):
        return FP32 * s.params
    return FP32 * (s.params // lay.num_gpus)


def optimizer_states_bytes(s: Shape, lay: Layout) -> int:
    """AdamW's two fp32 moments, partitioned like the master copy."""
    return 2 * master_weights_bytes(s, lay)


def _fp16_optimizer(s: Shape, lay: Layout) -> bool:
    """ZeRO-0 in fp16 runs DeepSpeed's FP16_Optimizer: an unpartitioned fp32 master copy."""
    return lay.zero_stage == 0 and s.precision == "fp16"


# ---------------------------------------------------------------- ZeRO buffers


def zero_buffers_bytes(s: Shape, lay: Layout, phase: str) -> int:
    """DeepSpeed's working buffers at its defaults.

    ZeRO 1-2: the contiguous reduce (ipg) bucket of reduce_bucket_size 16-bit elements,
    during backward (stage_1_and_2.py). ZeRO-3: the ipg bucket allocated at init
    (stage3.py), plus, outside the step, the gathered parameters of the module in use and
    the prefetched next one (capped by stage3_max_live_parameters) and that module's
    whole 16-bit gradient before its reduce-scatter (cf. DeepSpeed's
    `estimate_zero3_model_states_mem_needs`: 4 bytes x largest layer).
    """
    if lay.zero_stage in (1, 2):
        return 0 if phase == "step" else HALF * min(REDUCE_BUCKET_SIZE, s.params)
    if lay.zero_stage != 3:
        return 0
    ipg = HALF * REDUCE_BUCKET_SIZE
    if phase == "step" or lay.num_gpus == 1 and lay.offload != "all":
        return ipg  # one rank holds whole parameters: nothing to gather
    gathered = min(
        STAGE3_MAX_LIVE_PARAMETERS,
        s.largest_leaf_params + min(STAGE3_PREFETCH_BUCKET_SIZE, s.layer_params),
    )
    return ipg + HALF * (gathered + s.largest_leaf_params)


# ---------------------------------------------------------------- activations
# Counted tensor by tensor from the Llama decoder layer as transformers implements it
# (modeling_llama.py), in the style of Korthikanti et al. 2022 (arXiv 2205.05198),
# who count 34*s*b*h for a GPT layer; here the gated MLP and GQA change the sum.


def rmsnorm_saved_bytes_per_token(s: Shape) -> int:
    """RMSNorm upcasts to fp32 and saves it (4h), the normalised 16-bit x (2h), and
    its output is saved by the next linear layer (2h)."""
    return 8 * s.hidden


def attention_saved_bytes_per_token(s: Shape, lay: Layout) -> int:
    """Varlen flash attention saves q, k, v (after RoPE), its output and an fp32
    logsumexp per head (Dao 2023, FlashAttention-2); RoPE saves only cos/sin. Eager
    attention (transformers' eager_attention_forward) saves q, k and v repeated to all
    query heads (repeat_kv) and the attention output, 16-bit (its scores: see
    eager_attention_bytes_per_layer)."""
    if lay.attention == "eager":
        return HALF * 4 * s.q_size
    return HALF * (2 * s.q_size + 2 * s.kv_size) + FP32 * s.heads


def mlp_saved_bytes_per_token(s: Shape) -> int:
    """SwiGLU saves gate, silu(gate), up and their product: 4 x ffn 16-bit values."""
    return 4 * HALF * s.ffn


def layer_saved_bytes_per_token(s: Shape, lay: Layout) -> int:
    """Everything one decoder layer saves for backward, per token (no recompute)."""
    return 2 * rmsnorm_saved_bytes_per_token(s) + attention_saved_bytes_per_token(s, lay) + mlp_saved_bytes_per_token(s)


def eager_attention_bytes_per_layer(s: Shape, lay: Layout) -> int:
    """Eager attention keeps the fp32 softmax (4) and its 16-bit copy (2) for each of
    the heads on this rank over the whole packed sequence: quadratic in its length."""
    if lay.attention != "eager":
        return 0
    heads_here = s.heads // lay.sp_degree
    return lay.micro_batch_size * heads_here * s.seq_len * s.seq_len * (FP32 + HALF)


def layer_backward_transient_bytes_per_token(s: Shape) -> int:
    """Gradients in flight at a layer's backward peak, inside the gated MLP's backward
    right after down_proj's: the incoming hidden gradient (h), the gradient of
    act(gate)*up (ffn) and those of act(gate) and up (2 ffn), less act(gate)*up itself
    (ffn), which down_proj's backward has released; the outgoing hidden gradient is not
    made yet (measured with `ltune trace`, bench/accuracy.py)."""
    return HALF * (s.hidden + 2 * s.ffn)


def shared_layer_inputs_bytes(s: Shape, lay: Layout) -> int:
    """Inputs every layer reads, made once: RoPE cos and sin (16-bit, head_dim per token)
    and, for eager attention, transformers' additive 16-bit mask over the whole sequence."""
    t = tokens_per_rank(s, lay)
    rope = 2 * HALF * t * (s.q_size // s.heads)
    mask = lay.micro_batch_size * s.seq_len * s.seq_len * HALF if lay.attention == "eager" else 0
    return rope + mask


def activation_checkpoints_bytes(s: Shape, lay: Layout) -> int:
    """Full recompute keeps each layer's 16-bit input (Korthikanti et al.: 2sbh per layer);
    without recompute every layer keeps all it saves."""
    t = tokens_per_rank(s, lay)
    if lay.recompute == "full":
        return s.layers * HALF * s.hidden * t
    per_layer = layer_saved_bytes_per_token(s, lay) * t + eager_attention_bytes_per_layer(s, lay)
    return s.layers * per_layer


def eager_backward_bytes_per_layer(s: Shape, lay: Layout) -> int:
    """Eager attention's own backward peak, at the softmax backward: the saved fp32
    softmax, the fp32 gradient of the probabilities and the fp32 softmax gradient
    (3 x 4 bytes per score; the 16-bit probabilities are released by then), beside the
    layer's input norm (8h), q and the repeated k (2 x q), the gradient of the attention
    output (q) and the incoming hidden gradient (h), 16-bit. Without recompute the saved
    fp32 softmax and 16-bit probabilities already count in the checkpoints."""
    if lay.attention != "eager":
        return 0
    t = tokens_per_rank(s, lay)
    scores = eager_attention_bytes_per_layer(s, lay) // (FP32 + HALF)
    if lay.recompute == "full":
        return 3 * FP32 * scores + HALF * t * (5 * s.hidden + 3 * s.q_size)
    return (2 * FP32 - HALF) * scores + HALF * t * (s.hidden + 2 * s.q_size)


def activation_working_bytes(s: Shape, lay: Layout) -> int:
    """One layer's working set in backward: its recomputed activations (with full
    recompute) and the gradients in flight, at the larger of the MLP's and (eager)
    attention's backward peaks."""
    t = tokens_per_rank(s, lay)
    work = layer_backward_transient_bytes_per_token(s) * t
    if lay.recompute == "full":
        work += layer_saved_bytes_per_token(s, lay) * t + eager_attention_bytes_per_layer(s, lay)
    return max(work, eager_backward_bytes_per_layer(s, lay))


def final_norm_bytes(s: Shape, lay: Layout) -> int:
    """The final RMSNorm's saved tensors, live from the last layer to the loss backward."""
    return rmsnorm_saved_bytes_per_token(s) * tokens_per_rank(s, lay)


# ---------------------------------------------------------------- logits and loss


def logits_loss_bytes(s: Shape, lay: Layout) -> int:
    """The output layer and cross-entropy at their peak (the loss backward).

    Full: transformers' ForCausalLMLoss upcasts the 16-bit logits to fp32 and runs
    log-softmax (reference.md); its backward holds the fp32 log-probabilities, their
    gradient and the input gradient at once: 3 x 4 bytes per logit (Megatron-LM counts
    the fp32 cross-entropy at 4*s*b*V).

    Chunked (ltune/trainer/chunked_loss.py, whose `chunked_loss_bytes` gives the same
    moments), c = min(chunk_tokens, t): the fp32 logsumexp per token (4t) plus the largest
    of three moments: forward, the chunk's fp32 logits and logsumexp's same-size fp32
    temporary (8cV; ATen logsumexp_out_impl); backward, the chunk's fp32 gradient and its
    16-bit cast (6cV) beside the fp32 weight-gradient accumulator (4Vh) and the 16-bit
    hidden gradient (2th); backward, the 16-bit chunk gradient (2cV), the accumulator and
    one chunk's 16-bit V x h product (6Vh), and the hidden gradient. Measured with
    `ltune trace` and on an H200 (V 128256, h 2048, 16384 tokens, chunks of 4096: full
    23.48 GiB, this term 23.49; chunked 4.01 GiB, this term 3.98).
    """
    t = tokens_per_rank(s, lay)
    if lay.loss == "full":
        return 3 * FP32 * s.vocab * t
    cv, vh, th = min(s.chunk_tokens, t) * s.vocab, s.vocab * s.hidden, t * s.hidden
    return FP32 * t + max(
        2 * FP32 * cv,
        (HALF + FP32) * cv + FP32 * vh + HALF * th,
        HALF * cv + (FP32 + HALF) * vh + HALF * th,
    )


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
    bytes/param of its partition), plus the 16-bit parameters and gradient partitions
    (ZeRO-Offload, Ren et al. 2021)."""
    if lay.offload == "none":
        return 0
    part = s.params // lay.num_gpus
    host = 16 * part + HALF * part  # fp32 master, 2 moments, fp32 grads; 16-bit grads
    if lay.offload == "all":
        host += HALF * part
    return host


# ---------------------------------------------------------------- the whole breakdown

PHASES = ("loss", "backward", "step")


STATE_TERMS = ("weights", "gradients", "gradients_fp32", "master_weights", "optimizer_states", "zero_buffers")
ACTIVATION_TERMS = ("activations_checkpoints", "activations_layer", "logits_loss")


def state_terms(s: Shape, lay: Layout, phase: str) -> dict[str, int]:
    """Model states and ZeRO buffers: depend on the GPU count, ZeRO stage and offload only."""
    return {
        "weights": weights_bytes(s, lay),
        "gradients": gradients_bytes(s, lay),
        "gradients_fp32": gradients_fp32_bytes(s, lay, phase),
        "master_weights": master_weights_bytes(s, lay),
        "optimizer_states": optimizer_states_bytes(s, lay),
        "zero_buffers": zero_buffers_bytes(s, lay, phase),
    }


def activation_terms(s: Shape, lay: Layout, phase: str) -> dict[str, int]:
    """Activations, logits and loss: depend on sp degree, micro-batch, recompute, loss
    and attention only (the optimizer step holds none)."""
    terms = dict.fromkeys(ACTIVATION_TERMS, 0)
    shared = shared_layer_inputs_bytes(s, lay)
    if phase == "loss":
        terms["activations_checkpoints"] = activation_checkpoints_bytes(s, lay) + final_norm_bytes(s, lay) + shared
        terms["logits_loss"] = logits_loss_bytes(s, lay)
    elif phase == "backward":
        terms["activations_checkpoints"] = activation_checkpoints_bytes(s, lay) + shared
        terms["activations_layer"] = activation_working_bytes(s, lay)
        terms["logits_loss"] = tied_output_grad_bytes(s)
    return terms


def tied_output_grad_bytes(s: Shape) -> int:
    """With tied embeddings the output layer's 16-bit weight gradient waits, through the
    whole layers' backward, for the embedding's backward to add its own (autograd sums
    the two uses of one leaf before AccumulateGrad, so ZeRO's hooks see it only then)."""
    return HALF * s.vocab * s.hidden if s.tied else 0


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
        host_capacity_bytes_per_node=host_mem_bytes or gpu.host_mem_bytes_per_node,
        peak_phase=phase,
    )
