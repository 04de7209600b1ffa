"""Step time v2: separate terms, each with its source, and the exposed part of communication.

- matmuls: the linear layers' FLOPs (2 per multiply-add: 6 per parameter and token for forward
  and backward, 2 more for a recomputed forward) at the GPU's measured matmul rate
  (GpuProfile.matmul_efficiency, stas00 MAMF) times MATMUL_EFFICIENCY;
- attention: the FLOPs the flash kernel executes (the causal half; per document with packing
  and varlen attention, Shape.attention_tokens) at the published FlashAttention-2 kernel rate of
  the GPU (GpuProfile.flash_attention_tflops) times ATTENTION_EFFICIENCY;
- memory-bound work (norms, activation functions, residual adds, rotary embeddings, casts): bytes
  proportional to each layer's hidden and MLP activations at the GPU's HBM bandwidth
  (elementwise_seconds; Ivanov et al. 2021 'Data Movement Is All You Need': such operators take
  about a third of BERT's training time for a fraction of a percent of its FLOPs), so a GPU with
  more FLOPs per byte of HBM (H100 against A100) loses a larger share of its step to it;
- ZeRO-3 gathers and reduce-scatters, of which ZERO3_OVERLAP can hide under compute; ZeRO 0-2
  gradient and parameter collectives, Ulysses all-to-alls and offload exposed;
  NVLink inside a node; a ring across nodes runs one channel through each of the node's NICs,
  so its bus bandwidth is the node's NICs together (collective_bandwidth), while an all-to-all's
  off-node share goes through each GPU's own NIC (all_to_all_seconds).

Three of the four efficiency constants (MATMUL_EFFICIENCY, ELEMENTWISE_PASSES, ZERO3_OVERLAP) are
fitted on published A100 80GB runs of three independent sources, torchtitan (FSDP2), XTuner
(DeepSpeed ZeRO-3) and MosaicML llm-foundry's MPT benchmarks (Composer FSDP)
(planner/calibration_data.py FITTED_RUNS; ATTENTION_EFFICIENCY stays 1.0) by least squares
on the log error; bench/calibration.py prints the fit, every run's error and each source's error
when it is left out of the fit. MFU keeps the PaLM convention
(model_flops_per_token: 6N + 12*L*H*Q*T, no causal halving), as published MFU figures do.

Adapter fine-tuning (LoRA, QLoRA; Shape.adapters): the frozen weights need no weight-gradient
matmul, only the input gradient, so a frozen linear layer costs 2N forward + 2N backward per token
(4N instead of 6N; the frozen output head too), the adapters 6 per adapter parameter (two small
matmuls each, their weight and input gradients), a recomputed forward 2 per parameter of both.
QLoRA dequantizes every 4-bit weight before each use (forward, recomputed forward, backward: a
memory-bound kernel, dequant_seconds). ZeRO reduces the gradients of the trainable parameters
only; ZeRO-3 still gathers every parameter, frozen ones included.

Mixture of experts (Shape.is_moe): a token's matmuls use its ACTIVE parameters (attention, the
router's E x h, its top-k routed experts, the shared experts, the dense layers' MLPs:
active_layers_params), and MFU is 6 x active + attention (as MoE papers report it: Mixtral,
DeepSeek-V2/V3); ZeRO moves the TOTAL parameters: ZeRO-3 gathers each layer's whole 3-D expert
tensors (every expert) for the forward and the backward, and every expert gets a gradient (zeros
where no token went) to reduce-scatter, so a MoE job's step can be set by communication. The
experts run at the dense matmul rate (no grouped-GEMM discount: see routed_expert_params_per_token).
Multi-head latent attention (Shape.is_mla): q and k heads are nope + rope wide, v heads
value_head_size, so the PV matmul and the attention output use value_size.
"""

from __future__ import annotations

import math

from ..profiles.schema import GpuProfile
from .shape import Shape, tokens_per_rank
from .schema import Layout, Throughput

#: share of the measured matmul rate (peak x GpuProfile.matmul_efficiency) the linear layers of a
#: training step reach (fitted: bench/calibration.py)
MATMUL_EFFICIENCY = 0.92

#: memory-bound bytes per token and layer, in passes over the layer's hidden and MLP activations
#: (hidden_size + the MLP width a token runs) in the model dtype per forward (the backward counted
#: as two forwards, a recomputed forward as one more), at the HBM bandwidth (fitted: bench/calibration.py)
ELEMENTWISE_PASSES = 25.0

#: share of the published FlashAttention-2 kernel rate (GpuProfile.flash_attention_tflops) the
#: attention of a training step reaches: not fitted (the fitted runs, 2k-8k, hardly constrain it),
#: so XTuner's held-out 32k-1M runs test the kernel benchmark's rate as published
ATTENTION_EFFICIENCY = 1.0

#: share of ZeRO-3 / FSDP parameter gathers and gradient reduce-scatters that prefetching hides
#: under compute; the rest is exposed even when compute is longer (fitted: bench/calibration.py;
#: near 0: at the NICs' full bus bandwidth the fitted runs are best explained with all of the
#: traffic exposed, and as no fitted cluster's measured bus bandwidth is published, it also
#: absorbs a network below its line rate)
ZERO3_OVERLAP = 0.01

#: FlashAttention's benchmark counts the backward as 2.5 forwards (benchmarks/benchmark_flash_attention.py:
#: 5 matmuls against 2); its published rates are in that convention
FLASH_BWD_PER_FWD = 2.5

#: DeepSpeed CPU-Adam update rate per GPU's share of a node's cores, parameters/s
#: (ZeRO-Offload, Ren et al. 2021, reports ~1B params/s on a 2x24-core host, shared by 8 GPUs).
CPU_ADAM_PARAMS_PER_S = 1.0e9 / 8

_RECOMPUTE_SHARE = {"full": 1.0, "none": 0.0}


def active(s: Shape) -> int:
    """Parameters one token's matmuls use: Shape.active_params for a MoE model (ModelProfile.active_params:
    the routed experts past its top-k left out, as MoE model cards count 'active'), all of them for a dense one."""
    return s.active_params if s.is_moe else s.params


def value_size(s: Shape) -> int:
    """Width of all query heads' values (the PV matmul's and the attention output's): heads x v head
    size (MLA's v_head_dim, DeepSeek-V2 paper arXiv 2405.04434 sec. 2.1); q_size otherwise."""
    return s.num_attention_heads * s.value_head_size if s.is_mla else s.q_size


def mfu_attention_flops_per_token(s: Shape) -> float:
    """PaLM's attention term (Chowdhery et al. 2022 app. B) 12*L*H*Q*T: 2*T*q for QK^T and 2*T*q for
    PV forward, x3 with backward; MLA: 6*L*T*(q + v), its v heads being narrower than q/k."""
    if s.is_mla:
        return 6.0 * s.num_layers * (s.q_size + value_size(s)) * s.seq_len
    return 12.0 * s.num_layers * s.q_size * s.seq_len


def model_flops_per_token(s: Shape) -> float:
    """Model FLOPs per token, the MFU convention (PaLM, Chowdhery et al. 2022 app. B: forward and
    backward, attention over the full context, no causal halving, no recompute): 6N + 12*L*H*Q*T
    for full fine-tuning. With adapters it is the FLOPs the method needs, not 6N: 4N for the frozen
    weights (forward and input gradient, no weight gradient) + 6 per adapter parameter, attention
    unchanged; 6N would count weight gradients no LoRA run computes and report ~1.5x the real
    utilisation (MFU above what the hardware does). The 4-bit dequantization of QLoRA is memory
    traffic, not model FLOPs: it lowers QLoRA's MFU. MoE models: N is the ACTIVE parameters
    (`active`; Mixtral, Jiang et al. 2024, and DeepSeek-V3 report MFU this way)."""
    attention = mfu_attention_flops_per_token(s)
    if not s.adapters:
        return 6.0 * active(s) + attention
    return 4.0 * active(s) + 6.0 * s.trainable_params + attention


def hardware_flops_per_token(s: Shape, lay: Layout) -> float:
    """Model FLOPs plus one more forward with full recompute (2 per active parameter, adapters
    included, + 4*L*H*Q*T; MLA 2*L*T*(q + v))."""
    if lay.recompute != "full":
        return model_flops_per_token(s)
    adapters = s.trainable_params if s.adapters else 0
    return model_flops_per_token(s) + 2.0 * (active(s) + adapters) + mfu_attention_flops_per_token(s) / 3.0


def recompute_share(lay: Layout) -> float:
    """Share of the layers' forward that gradient checkpointing runs again: 1 for full, 0 for none."""
    return _RECOMPUTE_SHARE[lay.recompute]


def routed_expert_params(s: Shape) -> int:
    """All routed experts of one MoE layer: E x (gate_up 2F x h + down h x F) (modeling_mixtral.py
    `MixtralExperts`, ModelProfile.expert_tensors); 0 for a dense model."""
    return s.num_experts * 3 * s.hidden_size * s.moe_intermediate_size


def routed_expert_params_per_token(s: Shape) -> int:
    """The routed experts one token runs in one MoE layer: top-k x (2F x h + h x F) (transformers
    integrations/moe.py `grouped_mm_experts_forward`: S = tokens x top_k rows through one grouped
    matmul up and one down). Counted at the dense matmul rate: grouped GEMMs over E experts of
    ~S/E rows each run below it when S/E is small (qwen3's 128 experts), a loss not modelled here
    (no published grouped_mm figure for these shapes held out of a fit)."""
    return s.num_experts_per_tok * 3 * s.hidden_size * s.moe_intermediate_size


def router_params(s: Shape) -> int:
    """The router of one MoE layer, experts x h (modeling_mixtral.py `MixtralTopKRouter.weight`,
    deepseek's `gate.weight`): one h -> E matmul per token."""
    return s.num_experts * s.hidden_size


def shared_expert_params(s: Shape) -> int:
    """The shared experts of one MoE layer, which every token runs: a gated MLP of their total width
    (3 x h x Fs, ModelProfile.shared_expert_tensors) plus qwen2_moe's 1-output sigmoid gate (h)."""
    return 3 * s.hidden_size * s.shared_expert_intermediate_size + (s.hidden_size if s.shared_expert_gate else 0)


def moe_layer_active_params(s: Shape) -> int:
    """Parameters one token uses in a MoE layer (Shape.layer_params is the typical MoE layer): its
    attention and norms, the router, its top-k routed experts and the shared experts."""
    attention_and_norms = s.layer_params - router_params(s) - routed_expert_params(s) - shared_expert_params(s)
    return attention_and_norms + router_params(s) + routed_expert_params_per_token(s) + shared_expert_params(s)


def dense_layers_params(s: Shape) -> int:
    """The dense layers of a MoE model (deepseek's first layers, qwen's mlp_only_layers), whole:
    all layers' parameters less the MoE layers'."""
    return s.layers_params - s.num_moe_layers * s.layer_params


def active_layers_params(s: Shape) -> int:
    """Decoder-layer parameters one token uses: every layer's for a dense model; a MoE model's MoE
    layers' active share plus its dense layers."""
    if not s.is_moe:
        return s.num_layers * s.layer_params
    return s.num_moe_layers * moe_layer_active_params(s) + dense_layers_params(s)


def matmul_flops_per_token(s: Shape, recomputed: float) -> float:
    """Linear-layer FLOPs per token (Kaplan et al. 2020, 2 per multiply-add): 6 per layer parameter
    for forward and backward plus 2*recomputed for checkpointed layers; 6 per output-head
    parameter (the embedding is a lookup, no matmul; a tied head still multiplies). With adapters:
    the frozen layers' and head's share (frozen_matmul_flops_per_token) plus the adapters'.
    MoE models: the active layer parameters (active_layers_params)."""
    if s.adapters:
        return frozen_matmul_flops_per_token(s, recomputed) + adapter_flops_per_token(s, recomputed)
    return (6.0 + 2.0 * recomputed) * active_layers_params(s) + 6.0 * s.vocab_size * s.hidden_size


def frozen_matmul_flops_per_token(s: Shape, recomputed: float) -> float:
    """Frozen weights (Hu et al. 2021, LoRA sec. 4.2: no gradients for frozen weights): 2 per layer
    parameter forward, 2 backward for the input gradient, no weight gradient, 2*recomputed; the
    frozen output head 2 + 2 (its input gradient feeds every adapter below it). MoE models: the
    active layer parameters (active_layers_params)."""
    return (4.0 + 2.0 * recomputed) * active_layers_params(s) + 4.0 * s.vocab_size * s.hidden_size


def adapter_flops_per_token(s: Shape, recomputed: float) -> float:
    """LoRA adapters (peft `Linear.forward`: lora_B(lora_A(dropout(x))) * alpha / r): two matmuls of
    r x (in + out) multiply-adds, 2 per adapter parameter forward, 4 backward (weight and input
    gradients), 2*recomputed; 0 without adapters."""
    if not s.adapters:
        return 0.0
    return (6.0 + 2.0 * recomputed) * s.trainable_params


def attention_flops_per_token(s: Shape, attention: str, recomputed: float) -> float:
    """Attention-core FLOPs per token as the kernel executes them, in FlashAttention's benchmark
    convention: forward 4*d*Q per layer over the d keys a query sees, halved for causal
    (flash kernels skip masked blocks; eager attention computes the whole d x d score matrix),
    backward 2.5x forward, plus the recomputed forward. With varlen attention d is the mean
    packed document (Shape.attention_tokens); eager attention spans the whole packed sequence.
    MLA: QK^T over q_size (nope + rope heads), PV over value_size: 2*d*(q + v) forward, halved causal."""
    if s.is_mla:
        fwd = (2.0 * s.seq_len if attention == "eager" else 1.0 * s.attention_tokens) * (s.q_size + value_size(s))
    elif attention == "eager":
        fwd = 4.0 * s.seq_len * s.q_size
    else:
        fwd = 2.0 * s.attention_tokens * s.q_size
    return s.num_layers * fwd * (1.0 + FLASH_BWD_PER_FWD + recomputed)


def matmul_flops_per_s(gpu: GpuProfile, precision: str) -> float:
    """Measured matmul ceiling (peak x MAMF share, stas00/ml-engineering) times MATMUL_EFFICIENCY."""
    return gpu.peak_flops(precision) * gpu.matmul_efficiency * MATMUL_EFFICIENCY


def attention_flops_per_s(gpu: GpuProfile, precision: str, attention: str) -> float:
    """Flash kernels: the published FlashAttention-2 rate (bf16/fp16) scaled to the precision's
    peak, times ATTENTION_EFFICIENCY; eager attention is plain matmuls at the matmul rate."""
    if attention == "eager":
        return matmul_flops_per_s(gpu, precision)
    half = max(gpu.bf16_tflops, gpu.fp16_tflops) * 1e12
    return gpu.flash_attention_tflops * 1e12 * gpu.peak_flops(precision) / half * ATTENTION_EFFICIENCY


def matmul_seconds(s: Shape, lay: Layout, gpu: GpuProfile, recomputed: float) -> float:
    """This rank's linear-layer time for one micro-batch."""
    return tokens_per_rank(s, lay) * matmul_flops_per_token(s, recomputed) / matmul_flops_per_s(gpu, s.precision)


def attention_seconds(s: Shape, lay: Layout, gpu: GpuProfile, recomputed: float) -> float:
    """This rank's attention time for one micro-batch: with Ulysses each rank runs 1/sp of the
    heads over the whole sequence, the same FLOPs as its 1/sp of the tokens over all heads."""
    flops = tokens_per_rank(s, lay) * attention_flops_per_token(s, lay.attention, recomputed)
    return flops / attention_flops_per_s(gpu, s.precision, lay.attention)


def dequant_bytes(s: Shape) -> int:
    """HBM traffic of dequantizing every 4-bit weight once (bitsandbytes `functional.dequantize_4bit`):
    the packed values and constants read, the model-dtype weight written; 0 without QLoRA."""
    if not s.quantized_params:
        return 0
    return s.quantized_bytes + s.dtype_bytes * s.quantized_params


def dequant_seconds(s: Shape, gpu: GpuProfile, recomputed: float) -> float:
    """QLoRA's dequantizations of one micro-batch on one rank (Dettmers et al. 2023 sec. 3;
    bitsandbytes `autograd._functions.MatMul4Bit`: dequantize_4bit in forward and again in backward
    for the input gradient, and in the recomputed forward), memory-bound at the HBM bandwidth.
    Per micro-batch, not per token: every rank holds and dequantizes every weight (ZeRO 0-2)."""
    return (2.0 + recomputed) * dequant_bytes(s) / gpu.hbm_bandwidth_bytes_per_s


def mlp_width_per_token(s: Shape) -> float:
    """The MLP width one token runs, averaged over the layers: intermediate_size for a dense model;
    a MoE model's MoE layers run top-k routed experts and the shared experts, its dense layers
    (deepseek's first layers) their own MLP."""
    if not s.is_moe:
        return float(s.intermediate_size)
    moe = s.num_experts_per_tok * s.moe_intermediate_size + s.shared_expert_intermediate_size
    dense_layers = s.num_layers - s.num_moe_layers
    return (s.num_moe_layers * moe + dense_layers * s.intermediate_size) / s.num_layers


def elementwise_seconds(s: Shape, lay: Layout, gpu: GpuProfile, recomputed: float) -> float:
    """This rank's memory-bound work for one micro-batch: ELEMENTWISE_PASSES x the model dtype's bytes
    over every layer's hidden and MLP activations (h + mlp_width_per_token) per token, for the forward,
    the backward (two) and the recomputed forward, at the HBM bandwidth (Ivanov et al. 2021)."""
    width = s.hidden_size + mlp_width_per_token(s)
    traffic = ELEMENTWISE_PASSES * s.dtype_bytes * width * s.num_layers * (3.0 + recomputed)
    return tokens_per_rank(s, lay) * traffic / gpu.hbm_bandwidth_bytes_per_s


def compute_seconds(s: Shape, lay: Layout, gpu: GpuProfile, recomputed: float | None = None) -> float:
    """Matmul, attention and memory-bound time of one micro-batch on one rank (plus QLoRA's
    dequantization)."""
    r = recompute_share(lay) if recomputed is None else recomputed
    return (matmul_seconds(s, lay, gpu, r) + attention_seconds(s, lay, gpu, r)
            + elementwise_seconds(s, lay, gpu, r) + dequant_seconds(s, gpu, r))


def collective_bandwidth(gpu: GpuProfile, ranks: int) -> float:
    """Bus bandwidth of a ring collective over `ranks` GPUs: NVLink inside a node; across nodes NCCL
    runs one ring channel through each of the node's NICs, so the bus bandwidth is the node's NICs
    together (gpus_per_node x the per-GPU NIC share), capped by NVLink (nccl-tests #152: 'theoretical
    100 GB/s (25GB/s per HDR)' for four HDR NICs per A100 node; #100: 91 GB/s measured busbw on two
    HGX A100 with four 200 Gb/s NICs)."""
    intra = gpu.intra_node_bandwidth_bytes_per_s
    if ranks <= gpu.gpus_per_node:
        return intra
    return min(intra, gpu.gpus_per_node * gpu.inter_node_bandwidth_bytes_per_s)


def all_to_all_seconds(bytes_per_rank: float, ranks: int, gpu: GpuProfile) -> float:
    """An all-to-all of bytes_per_rank from each of `ranks` GPUs (1/ranks to each peer): the share for
    peers in the node over NVLink, the share for peers in other nodes through the GPU's own share of
    the node's NICs (every GPU of the node sends at once), both at the same time; the slowest rank
    sets the time. Groups are runs of consecutive ranks, so a group can straddle a node boundary: a
    rank has at most min(ranks, gpus_per_node) members of its group in its node, and at least
    gcd(ranks, gpus_per_node) (sp 6 on 8-GPU nodes: ranks 0-5 share a node, ranks 6-11 put two on
    one node and four on the next), so the most NVLink traffic and the most NIC traffic of any rank."""
    most_inside = min(ranks, gpu.gpus_per_node) - 1
    most_across = ranks - math.gcd(ranks, gpu.gpus_per_node)
    inside = bytes_per_rank * most_inside / ranks / gpu.intra_node_bandwidth_bytes_per_s
    across = bytes_per_rank * most_across / ranks / gpu.inter_node_bandwidth_bytes_per_s
    return max(inside, across)


def ring_seconds(payload_bytes: float, ranks: int, bandwidth: float) -> float:
    """All-gather or reduce-scatter of a payload over a ring: (n-1)/n of it crosses each link."""
    if ranks <= 1:
        return 0.0
    return payload_bytes * (ranks - 1) / ranks / bandwidth


def zero_comm_seconds(s: Shape, lay: Layout, gpu: GpuProfile) -> tuple[float, float]:
    """(overlappable per micro-batch, exposed per step) ZeRO traffic.

    ZeRO-3 gathers the model-dtype parameters for the forward and again for the backward (a
    checkpointed layer's recompute runs right before its backward, on the same gather), and
    reduce-scatters the gradients: 3x the parameter volume (Rajbhandari et al. 2020, 1.5x
    data-parallel traffic). ZeRO 0-2 reduce the gradients and all-gather the updated
    parameters once per step (an all-reduce's volume), counted exposed. With adapters only the
    trainable parameters have gradients (and updates to gather); ZeRO-3 still gathers every
    parameter, the frozen weights too (DeepSpeed partitions them all). MoE models: the TOTAL
    parameters, not the active ones: ZeRO-3 gathers each layer's whole 3-D expert tensors (every
    expert, whichever the tokens use) and every expert's gradient is reduced (zeros where unused).
    """
    n = lay.num_gpus
    bw = collective_bandwidth(gpu, n)
    param_bytes = s.dtype_bytes * s.stored_params
    grad_bytes = s.dtype_bytes * s.optimized_params
    if lay.zero_stage == 3:
        if not s.adapters:
            return 3 * ring_seconds(param_bytes, n, bw), 0.0
        return 2 * ring_seconds(param_bytes, n, bw) + ring_seconds(grad_bytes, n, bw), 0.0
    return 0.0, 2 * ring_seconds(grad_bytes, n, bw)


def exposed_zero3_seconds(comm: float, compute: float) -> float:
    """ZeRO-3 traffic left on the critical path: ZERO3_OVERLAP of it can hide under compute, the
    rest (first gather, last reduce-scatter, bucket waits) cannot."""
    return comm - min(ZERO3_OVERLAP * comm, compute)


def ulysses_seconds(s: Shape, lay: Layout, gpu: GpuProfile, recomputed: float | None = None) -> float:
    """Ulysses all-to-alls (Jacobs et al. 2023): q, k, v and the output per layer in
    forward, their gradients in backward, again in the recomputed forward; each moves
    (sp-1)/sp of the rank's activations (all_to_all_seconds), on the critical path. MLA: v and
    the output are value_size wide (heads x v_head_dim), k q_size."""
    if lay.sp_degree == 1:
        return 0.0
    r = recompute_share(lay) if recomputed is None else recomputed
    t = tokens_per_rank(s, lay)
    if s.is_mla:
        per_layer = s.dtype_bytes * t * (s.q_size + s.kv_size + 2 * value_size(s))
    else:
        per_layer = s.dtype_bytes * t * (2 * s.q_size + 2 * s.kv_size)
    return all_to_all_seconds(s.num_layers * (2 + r) * per_layer, lay.sp_degree, gpu)


def offload_seconds(s: Shape, lay: Layout, gpu: GpuProfile) -> float:
    """Optimizer offload: gradients down and parameters up over PCIe, and CPU-Adam
    (ZeRO-Offload), for the trainable parameters; parameter offload adds the ZeRO-3 gathers'
    host reads of every parameter (frozen ones too)."""
    if lay.offload == "none":
        return 0.0
    part = s.optimized_params / lay.num_gpus
    pcie = (4 * part + s.dtype_bytes * part) / gpu.host_link_bandwidth_bytes_per_s
    adam = part / CPU_ADAM_PARAMS_PER_S
    if lay.offload == "all":
        stored_part = s.stored_params / lay.num_gpus
        pcie += 2 * s.dtype_bytes * stored_part / gpu.host_link_bandwidth_bytes_per_s
    return pcie + adam


def step_seconds(
    s: Shape, lay: Layout, gpu: GpuProfile, grad_accum: int = 1, recomputed: float | None = None,
) -> tuple[float, float]:
    """(step time, exposed communication) of one optimizer step of grad_accum micro-batches;
    `recomputed` overrides the layout's recompute share (selective checkpointing)."""
    r = recompute_share(lay) if recomputed is None else recomputed
    compute = compute_seconds(s, lay, gpu, r) * grad_accum
    overlappable, exposed = zero_comm_seconds(s, lay, gpu)
    exposed_comm = (
        exposed_zero3_seconds(overlappable * grad_accum, compute)
        + exposed
        + ulysses_seconds(s, lay, gpu, r) * grad_accum
        + offload_seconds(s, lay, gpu)
    )
    return compute + exposed_comm, exposed_comm


def tokens_per_s_per_gpu(s: Shape, lay: Layout, gpu: GpuProfile) -> float:
    """Tokens one GPU trains per second, one micro-batch per step (the search's ranking figure)."""
    return tokens_per_rank(s, lay) / step_seconds(s, lay, gpu)[0]


def estimate_throughput(
    s: Shape, lay: Layout, gpu: GpuProfile, grad_accum: int = 1, recomputed: float | None = None,
) -> Throughput:
    """Step time of one optimizer step (grad_accum micro-batches) and what it yields."""
    step, exposed_comm = step_seconds(s, lay, gpu, grad_accum, recomputed)
    tps = tokens_per_rank(s, lay) * grad_accum / step
    return Throughput(
        step_time_s=step,
        tokens_per_s_per_gpu=tps,
        mfu=tps * model_flops_per_token(s) / gpu.peak_flops(s.precision),
        compute_s=step - exposed_comm,
        exposed_comm_s=exposed_comm,
        flops_per_token=model_flops_per_token(s),
    )
