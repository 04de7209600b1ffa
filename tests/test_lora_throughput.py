"""Step time of adapter fine-tuning (LoRA, QLoRA) against hand counts: frozen weights without
weight-gradient matmuls, the adapters' own matmuls, QLoRA's dequantization, ZeRO traffic of the
trainable parameters only."""

import pytest
from conftest import tiny_arch

from ltune.planner import throughput as T
from ltune.planner.schema import Layout, Method
from ltune.planner.shape import Shape
from ltune.profiles import load_gpu, load_model

# conftest's tiny_arch: hidden 64, 2 layers, 4 heads of 16 (q 64), 2 kv heads (kv 32), MLP 128, vocab 384.
# Its linear layers, (in, out): q 64x64, k 64x32, v 64x32, o 64x64, gate 64x128, up 64x128, down 128x64.
TINY_LINEAR = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
TINY_NORMS = 2 * 64  # two RMSNorm weights per layer (counted with the layer, as the full model's count does)
TINY_HEAD = 384 * 64
TINY_LAYERS = 2
R = 4


def _tiny(kind: str, seq_len: int = 256) -> Shape:
    return Shape.of(tiny_arch(), seq_len, method=Method(kind=kind, lora_rank=R))


def test_tiny_matmul_flops_by_hand():
    """Per token and linear layer (in, out): full 2 forward + 2 input gradient + 2 weight gradient per
    weight; frozen 2 + 2; each adapter r x in and out x r: 2 + 2 + 2 per adapter weight."""
    full_layer = sum(6 * i * o for i, o in TINY_LINEAR) + 6 * TINY_NORMS          # 221,952
    frozen_layer = sum(4 * i * o for i, o in TINY_LINEAR) + 4 * TINY_NORMS        # 147,968
    adapter_layer = sum(6 * (R * i + o * R) for i, o in TINY_LINEAR)              # 6 x 4,096
    assert (full_layer, frozen_layer, adapter_layer) == (221_952, 147_968, 24_576)
    full = TINY_LAYERS * full_layer + 6 * TINY_HEAD
    lora = TINY_LAYERS * (frozen_layer + adapter_layer) + 4 * TINY_HEAD
    assert T.matmul_flops_per_token(_tiny("full"), 0.0) == full == 591_360
    assert T.matmul_flops_per_token(_tiny("lora"), 0.0) == lora == 443_392
    assert T.matmul_flops_per_token(_tiny("qlora"), 0.0) == lora  # same matmuls, on dequantized weights
    # a recomputed forward: 2 per frozen weight and per adapter weight
    recompute = TINY_LAYERS * (sum(2 * i * o for i, o in TINY_LINEAR) + 2 * TINY_NORMS
                               + sum(2 * R * (i + o) for i, o in TINY_LINEAR))
    assert T.matmul_flops_per_token(_tiny("lora"), 1.0) - lora == recompute == 164_352
    # attention has no weights: the same kernel work either way
    assert T.attention_flops_per_token(_tiny("lora"), "varlen", 1.0) == T.attention_flops_per_token(
        _tiny("full"), "varlen", 1.0)


def test_tiny_model_flops_by_hand():
    """MFU convention: PaLM's 6N + 12*L*Q*T for full; 4N + 6 x adapters + 12*L*Q*T for adapters."""
    n = 2 * TINY_HEAD + TINY_LAYERS * (sum(i * o for i, o in TINY_LINEAR) + TINY_NORMS) + 64
    adapters = TINY_LAYERS * sum(R * (i + o) for i, o in TINY_LINEAR)
    assert (n, adapters) == (123_200, 8_192)
    attention = 12 * TINY_LAYERS * 64 * 256
    assert T.model_flops_per_token(_tiny("full")) == 6 * n + attention
    assert T.model_flops_per_token(_tiny("lora")) == 4 * n + 6 * adapters + attention == 935_168


def test_tiny_dequantization_by_hand():
    """QLoRA reads each 4-bit weight (two values a byte, one 8-bit absmax per 64 values and one fp32
    per 256 absmax: double quantization) and writes it in bf16, in forward, backward and any
    recomputed forward, at the HBM bandwidth; per micro-batch, whatever its tokens."""
    per_layer_read = 0
    for i, o in TINY_LINEAR:
        numel = i * o
        blocks = numel // 64
        per_layer_read += numel // 2 + blocks + 4 * -(-blocks // 256)
    assert per_layer_read == 19_036
    read = TINY_LAYERS * per_layer_read
    written = 2 * TINY_LAYERS * sum(i * o for i, o in TINY_LINEAR)
    gpu = load_gpu("a100-80g")
    s = _tiny("qlora")
    assert T.dequant_bytes(s) == read + written == 185_528
    assert T.dequant_seconds(s, gpu, 0.0) == pytest.approx(2 * 185_528 / gpu.hbm_bandwidth_bytes_per_s, rel=1e-12)
    assert T.dequant_seconds(s, gpu, 1.0) == pytest.approx(3 * 185_528 / gpu.hbm_bandwidth_bytes_per_s, rel=1e-12)
    assert T.dequant_seconds(_tiny("lora"), gpu, 1.0) == 0.0
    # in the step: compute of one micro-batch of 1 or of 4 sequences differs by the matmuls, not the dequantization
    one, four = Layout(num_gpus=1, micro_batch_size=1), Layout(num_gpus=1, micro_batch_size=4)
    dq = T.dequant_seconds(s, gpu, 1.0)
    assert T.compute_seconds(s, four, gpu) - dq == pytest.approx(4 * (T.compute_seconds(s, one, gpu) - dq), rel=1e-9)


# Llama-3.1-8B: 32 layers, hidden 4096, q 4096, kv 1024, MLP 14336, vocab 128256 (config.json)
L, H, Q, KV, I, V = 32, 4096, 4096, 1024, 14336, 128256
LAYER = H * Q + 2 * H * KV + Q * H + 3 * H * I + 2 * H
ADAPTERS = 41_943_040  # r 16 on every linear layer: 16 x (in + out) summed, x 32 (peft's print_trainable_parameters)
N = 8_030_261_248


def test_adapter_count_by_hand():
    per_layer = 16 * ((H + Q) + 2 * (H + KV) + (Q + H) + 2 * (H + I) + (I + H))
    assert L * per_layer == ADAPTERS
    assert Shape.of(load_model("llama3.1-8b"), 8192, method=Method(kind="lora")).trainable_params == ADAPTERS


def test_lora_step_faster_by_the_flops_ratio():
    """One A100, no communication: LoRA's step is shorter than full fine-tuning's by the ratio of the
    FLOPs each executes (matmuls: 6 vs 4 per frozen weight, plus 6 per adapter weight; attention the
    same), within the small difference between the matmul and attention rates, once the memory-bound
    work both do alike (norms, activations: elementwise_seconds, the same for the frozen model) is
    taken out of both steps."""
    gpu = load_gpu("a100-80g")
    model = load_model("llama3.1-8b")
    attention = 2 * 8192 * Q * L * 3.5  # causal flash forward, backward 2.5x (test_planner_throughput)
    full_flops = 6 * L * LAYER + 6 * V * H + attention
    lora_flops = 4 * L * LAYER + 4 * V * H + 6 * ADAPTERS + attention
    flops_ratio = full_flops / lora_flops
    assert flops_ratio == pytest.approx(1.4, abs=0.02)
    lay = Layout(num_gpus=1, zero_stage=0, recompute="none")
    full = T.estimate_throughput(Shape.of(model, 8192), lay, gpu)
    lora = T.estimate_throughput(Shape.of(model, 8192, method=Method(kind="lora")), lay, gpu)
    alike = T.elementwise_seconds(Shape.of(model, 8192), lay, gpu, 0.0)
    assert alike == T.elementwise_seconds(Shape.of(model, 8192, method=Method(kind="lora")), lay, gpu, 0.0)
    assert (full.step_time_s - alike) / (lora.step_time_s - alike) == pytest.approx(flops_ratio, rel=0.02)
    # MFU counts what the method needs: 4N + 6 x adapters + PaLM's attention
    assert lora.flops_per_token == 4 * N + 6 * ADAPTERS + 12 * L * Q * 8192
    # QLoRA: the same matmuls and a little dequantization (memory-bound) on top
    qlora = T.estimate_throughput(Shape.of(model, 8192, method=Method(kind="qlora")), lay, gpu)
    assert 1.0 < qlora.step_time_s / lora.step_time_s < 1.02


def test_zero_traffic_of_adapters_by_hand():
    """ZeRO 0-2: gradients reduced and updates gathered for the adapters only (bf16, a ring over 8
    GPUs moves 7/8 of it per link); ZeRO-3 gathers every weight twice, frozen ones too, and
    reduce-scatters only the adapters' gradients."""
    gpu = load_gpu("a100-80g")
    bw = gpu.intra_node_bandwidth_bytes_per_s
    s = Shape.of(load_model("llama3.1-8b"), 8192, method=Method(kind="lora"))
    over, exposed = T.zero_comm_seconds(s, Layout(num_gpus=8, zero_stage=2), gpu)
    assert over == 0.0
    assert exposed == pytest.approx(2 * 2 * ADAPTERS * 7 / 8 / bw, rel=1e-12)
    over, exposed = T.zero_comm_seconds(s, Layout(num_gpus=8, zero_stage=3), gpu)
    assert exposed == 0.0
    assert over == pytest.approx((2 * 2 * (N + ADAPTERS) + 2 * ADAPTERS) * 7 / 8 / bw, rel=1e-12)
