"""Step time: compute at a calibrated efficiency plus the exposed part of communication.

FLOPs follow the PaLM convention (Chowdhery et al. 2022, appendix B): 6N + 12*L*H*Q*T
per token for a training step, with no causal halving; H*Q here is the query width.
Full recompute adds one forward pass (2N + 4*L*H*Q*T), which costs time but is not
counted in MFU.
"""

from __future__ import annotations

from ..profiles.schema import GpuProfile
from .shape import Shape, tokens_per_rank
from .schema import Layout, Throughput

#: Fraction of the measured matmul ceiling (GpuProfile.matmul_efficiency, stas00 MAMF)
#: that a whole training step reaches with flash attention and fused kernels.
#: Calibrated on the public runs in planner/calibration_data.py FITTED_RUNS (bench/calibration.py
#: prints the fit); the runs in HELD_OUT_RUNS are kept out of it.
KERNEL_EFFICIENCY = 0.686

#: share of prefetchable ZeRO traffic (all-gathers, reduce-scatters) hidden under compute
ZERO_OVERLAP = 1.0

#: DeepSpeed CPU-Adam update rate per GPU's share of a node's cores, parameters/s
#: (ZeRO-Offload, Ren et al. 2021, reports ~1B params/s on a 2x24-core host, shared by 8 GPUs).
CPU_ADAM_PARAMS_PER_S = 1.0e9 / 8


def model_flops_per_token(s: Shape) -> float:
    """6N + 12*L*H*Q*T (PaLM): forward and backward, attention over the full context."""
    return 6.0 * s.params + 12.0 * s.num_layers * s.q_size * s.seq_len


def hardware_flops_per_token(s: Shape, lay: Layout) -> float:
    """Model FLOPs plus one more forward with full recompute (2N + 4*L*H*Q*T)."""
    extra = 2.0 * s.params + 4.0 * s.num_layers * s.q_size * s.seq_len if lay.recompute == "full" else 0.0
    return model_flops_per_token(s) + extra


def compute_seconds(s: Shape, lay: Layout, gpu: GpuProfile) -> float:
    """Time for this rank's tokens at the calibrated share of the GPU's peak."""
    tokens = tokens_per_rank(s, lay)
    rate = gpu.peak_flops(s.precision) * gpu.matmul_efficiency * KERNEL_EFFICIENCY
    return tokens * hardware_flops_per_token(s, lay) / rate


def collective_bandwidth(gpu: GpuProfile, ranks: int) -> float:
    """Bus bandwidth of a collective over `ranks` GPUs: NVLink inside a node, the NIC across."""
    return gpu.intra_node_bandwidth_bytes_per_s if ranks <= gpu.gpus_per_node else gpu.inter_node_bandwidth_bytes_per_s


def ring_seconds(payload_bytes: float, ranks: int, bandwidth: float) -> float:
    """All-gather or reduce-scatter of a payload over a ring: (n-1)/n of it crosses each link."""
    if ranks <= 1:
        return 0.0
    return payload_bytes * (ranks - 1) / ranks / bandwidth


def zero_comm_seconds(s: Shape, lay: Layout, gpu: GpuProfile) -> tuple[float, float]:
    """(overlappable, exposed) ZeRO traffic of one micro-batch step.

    ZeRO-3 gathers the model-dtype parameters for forward, backward and, with recompute, the
    recomputed forward, and reduce-scatters gradients once (Rajbhandari et al. 2020:
    3x the data-parallel volume). ZeRO 1-2 reduce gradients and all-gather the updated
    parameters after the step, which nothing hides (overlap_comm is off by default).
    """
    n = lay.num_gpus
    bw = collective_bandwidth(gpu, n)
    param_bytes = s.dtype_bytes * s.params
    if lay.zero_stage == 3:
        gathers = 3 if lay.recompute == "full" else 2
        return (gathers + 1) * ring_seconds(param_bytes, n, bw), 0.0
    # ZeRO-0 all-reduces (reduce-scatter + all-gather volume); ZeRO 1-2 reduce-scatter
    # the gradients and all-gather the updated parameters: the same volume.
    return 0.0, 2 * ring_seconds(param_bytes, n, bw)


def ulysses_seconds(s: Shape, lay: Layout, gpu: GpuProfile) -> float:
    """Ulysses all-to-alls (Jacobs et al. 2023): q, k, v and the output per layer in
    forward, their gradients in backward, again in the recomputed forward; each moves
    (sp-1)/sp of the rank's activations, on the critical path."""
    if lay.sp_degree == 1:
        return 0.0
    t = tokens_per_rank(s, lay)
    per_layer = s.dtype_bytes * t * (2 * s.q_size + 2 * s.kv_size)
    passes = 3 if lay.recompute == "full" else 2
    volume = s.num_layers * passes * per_layer * (lay.sp_degree - 1) / lay.sp_degree
    return volume / collective_bandwidth(gpu, lay.sp_degree)


def offload_seconds(s: Shape, lay: Layout, gpu: GpuProfile) -> float:
    """Optimizer offload: gradients down and parameters up over PCIe, and CPU-Adam
    (ZeRO-Offload); parameter offload adds the ZeRO-3 gathers' host reads."""
    if lay.offload == "none":
        return 0.0
    part = s.params / lay.num_gpus
    pcie = (4 * part + s.dtype_bytes * part) / gpu.host_link_bandwidth_bytes_per_s
    adam = part / CPU_ADAM_PARAMS_PER_S
    if lay.offload == "all":
        pcie += (3 if lay.recompute == "full" else 2) * s.dtype_bytes * part / gpu.host_link_bandwidth_bytes_per_s
    return pcie + adam


def step_seconds(s: Shape, lay: Layout, gpu: GpuProfile, grad_accum: int = 1) -> tuple[float, float]:
    """(step time, exposed communication) of one optimizer step of grad_accum micro-batches."""
    compute = compute_seconds(s, lay, gpu) * grad_accum
    overlappable, exposed = zero_comm_seconds(s, lay, gpu)
    overlappable *= grad_accum  # ZeRO-3 gathers every micro-batch; 0-2 reduce once a step
    hidden = min(overlappable, ZERO_OVERLAP * compute)
    exposed_comm = (
        (overlappable - hidden)
        + exposed
        + ulysses_seconds(s, lay, gpu) * grad_accum
        + offload_seconds(s, lay, gpu)
    )
    return compute + exposed_comm, exposed_comm


def tokens_per_s_per_gpu(s: Shape, lay: Layout, gpu: GpuProfile) -> float:
    return tokens_per_rank(s, lay) / step_seconds(s, lay, gpu)[0]


def estimate_throughput(s: Shape, lay: Layout, gpu: GpuProfile, grad_accum: int = 1) -> Throughput:
    """Step time of one optimizer step (grad_accum micro-batches) and what it yields."""
    step, exposed_comm = step_seconds(s, lay, gpu, grad_accum)
    tps = tokens_per_rank(s, lay) * grad_accum / step
    return Throughput(
        step_time_s=step,
        tokens_per_s_per_gpu=tps,
        mfu=tps * model_flops_per_token(s) / gpu.peak_flops(s.precision),
        compute_s=step - exposed_comm,
        exposed_comm_s=exposed_comm,
        flops_per_token=model_flops_per_token(s),
    )
