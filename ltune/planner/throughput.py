"""Step time v2: separate terms, each with its source, and the exposed part of communication.

- matmuls: the linear layers' FLOPs (2 per multiply-add: 6 per parameter and token for forward
  and backward, 2 more for a recomputed forward) at the GPU's measured matmul rate
  (GpuProfile.matmul_efficiency, stas00 MAMF) times MATMUL_EFFICIENCY;
- attention: the FLOPs the flash kernel executes (the causal half; per document with packing
  and varlen attention, Shape.attention_tokens) at the published FlashAttention-2 kernel rate of
  the GPU (GpuProfile.flash_attention_tflops) times ATTENTION_EFFICIENCY;
- ZeRO-3 gathers and reduce-scatters, of which ZERO3_OVERLAP can hide under compute; ZeRO 0-2
  gradient and parameter collectives, Ulysses all-to-alls and offload exposed;
  NVLink inside a node, the profile's per-GPU NIC across nodes.

Two of the three constants (MATMUL_EFFICIENCY, ZERO3_OVERLAP) are fitted on published runs
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
"""

from __future__ import annotations

from ..profiles.schema import GpuProfile
from .shape import Shape, tokens_per_rank
from .schema import Layout, Throughput

#: share of the measured matmul rate (peak x GpuProfile.matmul_efficiency) a whole training step
#: reaches on its linear layers, norms, activations and loss included (fitted: bench/calibration.py)
MATMUL_EFFICIENCY = 0.73

#: share of the published FlashAttention-2 kernel rate (GpuProfile.flash_attention_tflops) the
#: attention of a training step reaches: not fitted (the fitted runs, 4k-16k, hardly constrain it),
#: so XTuner's held-out 32k-1M runs test the kernel benchmark's rate as published
ATTENTION_EFFICIENCY = 1.0

#: share of ZeRO-3 / FSDP parameter gathers and gradient reduce-scatters that prefetching hides
#: under compute; the rest is exposed even when compute is longer (fitted: bench/calibration.py)
ZERO3_OVERLAP = 0.93

#: FlashAttention's benchmark counts the backward as 2.5 forwards (benchmarks/benchmark_flash_attention.py:
#: 5 matmuls against 2); its published rates are in that convention
FLASH_BWD_PER_FWD = 2.5

#: DeepSpeed CPU-Adam update rate per GPU's share of a node's cores, parameters/s
#: (ZeRO-Offload, Ren et al. 2021, reports ~1B params/s on a 2x24-core host, shared by 8 GPUs).
CPU_ADAM_PARAMS_PER_S = 1.0e9 / 8

_RECOMPUTE_SHARE = {"full": 1.0, "none": 0.0}


def model_flops_per_token(s: Shape) -> float:
    """Model FLOPs per token, the MFU convention (PaLM, Chowdhery et al. 2022 app. B: forward and
    backward, attention over the full context, no causal halving, no recompute): 6N + 12*L*H*Q*T
    for full fine-tuning. With adapters it is the FLOPs the method needs, not 6N: 4N for the frozen
    weights (forward and input gradient, no weight gradient) + 6 per adapter parameter, attention
    unchanged; 6N would count weight gradients no LoRA run computes and report ~1.5x the real
    utilisation (MFU above what the hardware does). The 4-bit dequantization of QLoRA is memory
    traffic, not model FLOPs: it lowers QLoRA's MFU."""
    attention = 12.0 * s.num_layers * s.q_size * s.seq_len
    if not s.adapters:
        return 6.0 * s.params + attention
    return 4.0 * s.params + 6.0 * s.trainable_params + attention


def hardware_flops_per_token(s: Shape, lay: Layout) -> float:
    """Model FLOPs plus one more forward with full recompute (2 per parameter, adapters
    included, + 4*L*H*Q*T)."""
    extra = 2.0 * stored_params(s) + 4.0 * s.num_layers * s.q_size * s.seq_len if lay.recompute == "full" else 0.0
    return model_flops_per_token(s) + extra


def stored_params(s: Shape) -> int:
    """Every parameter the model holds: the base weights, and the adapters beside them (LoRA, QLoRA)."""
    return s.params + s.trainable_params if s.adapters else s.params


def trainable(s: Shape) -> int:
    """Parameters with gradients and optimizer states: all (full), the adapters' (planner/lora.py)."""
    return s.trainable_params if s.adapters else s.params


def recompute_share(lay: Layout) -> float:
    """Share of the layers' forward that gradient checkpointing runs again: 1 for full, 0 for none."""
    return _RECOMPUTE_SHARE[lay.recompute]


def matmul_flops_per_token(s: Shape, recomputed: float) -> float:
    """Linear-layer FLOPs per token (Kaplan et al. 2020, 2 per multiply-add): 6 per layer parameter
    for forward and backward plus 2*recomputed for checkpointed layers; 6 per output-head
    parameter (the embedding is a lookup, no matmul; a tied head still multiplies). With adapters:
    the frozen layers' and head's share (frozen_matmul_flops_per_token) plus the adapters'."""
    if s.adapters:
        return frozen_matmul_flops_per_token(s, recomputed) + adapter_flops_per_token(s, recomputed)
    head = s.vocab_size * s.hidden_size
    return (6.0 + 2.0 * recomputed) * s.num_layers * s.layer_params + 6.0 * head


def frozen_matmul_flops_per_token(s: Shape, recomputed: float) -> float:
    """Frozen weights (Hu et al. 2021, LoRA sec. 4.2: no gradients for frozen weights): 2 per layer
    parameter forward, 2 backward for the input gradient, no weight gradient, 2*recomputed; the
    frozen output head 2 + 2 (its input gradient feeds every adapter below it)."""
    head = s.vocab_size * s.hidden_size
    return (4.0 + 2.0 * recomputed) * s.num_layers * s.layer_params + 4.0 * head


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
    packed document (Shape.attention_tokens); eager attention spans the whole packed sequence."""
    if attention == "eager":
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


def compute_seconds(s: Shape, lay: Layout, gpu: GpuProfile, recomputed: float | None = None) -> float:
    """Matmul plus attention time of one micro-batch on one rank (plus QLoRA's dequantization)."""
    r = recompute_share(lay) if recomputed is None else recomputed
    return matmul_seconds(s, lay, gpu, r) + attention_seconds(s, lay, gpu, r) + dequant_seconds(s, gpu, r)


def collective_bandwidth(gpu: GpuProfile, ranks: int) -> float:
    """Bus bandwidth of a collective over `ranks` GPUs: NVLink inside a node, the NIC across."""
    return gpu.intra_node_bandwidth_bytes_per_s if ranks <= gpu.gpus_per_node else gpu.inter_node_bandwidth_bytes_per_s


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
    parameter, the frozen weights too (DeepSpeed partitions them all).
    """
    n = lay.num_gpus
    bw = collective_bandwidth(gpu, n)
    param_bytes = s.dtype_bytes * stored_params(s)
    grad_bytes = s.dtype_bytes * trainable(s)
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
    (sp-1)/sp of the rank's activations, on the critical path."""
    if lay.sp_degree == 1:
        return 0.0
    r = recompute_share(lay) if recomputed is None else recomputed
    t = tokens_per_rank(s, lay)
    per_layer = s.dtype_bytes * t * (2 * s.q_size + 2 * s.kv_size)
    volume = s.num_layers * (2 + r) * per_layer * (lay.sp_degree - 1) / lay.sp_degree
    return volume / collective_bandwidth(gpu, lay.sp_degree)


def offload_seconds(s: Shape, lay: Layout, gpu: GpuProfile) -> float:
    """Optimizer offload: gradients down and parameters up over PCIe, and CPU-Adam
    (ZeRO-Offload), for the trainable parameters; parameter offload adds the ZeRO-3 gathers'
    host reads of every parameter (frozen ones too)."""
    if lay.offload == "none":
        return 0.0
    part = trainable(s) / lay.num_gpus
    pcie = (4 * part + s.dtype_bytes * part) / gpu.host_link_bandwidth_bytes_per_s
    adam = part / CPU_ADAM_PARAMS_PER_S
    if lay.offload == "all":
        stored_part = stored_params(s) / lay.num_gpus
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
