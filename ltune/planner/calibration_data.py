"""Published training throughput, with sources: the runs the step-time model's constants
(throughput.MATMUL_EFFICIENCY, ELEMENTWISE_PASSES, ZERO3_OVERLAP) are fitted on (three independent sources: torchtitan,
XTuner's 8k row, MosaicML llm-foundry's MPT benchmarks), runs on GPUs no profile describes, and
XTuner's runs beyond 8k, held out of every fit as an independent check (bench/calibration.py prints all;
tests/test_planner_throughput.py tests them). The only copy of these figures: every number below
was read in its source, none is derived from another run."""

from __future__ import annotations

from dataclasses import dataclass

from ..profiles import load_model
from ..profiles.schema import ModelProfile
from .schema import Layout


@dataclass(frozen=True)
class PublishedRun:
    """One public training run, described as ltune's layout, and its measured speed."""

    label: str
    origin: str  # the independent source (one team's benchmark): the unit left out of a fit
    model: str | ModelProfile  # model profile name, or a stand-in built below (MPT)
    gpu: str  # GPU profile name
    seq_len: int
    layout: Layout
    tokens_per_s_per_gpu: float  # measured
    source: str
    grad_accum: int = 1  # micro-batches per optimizer step
    recomputed: float | None = None  # share of the forward recomputed, when not the layout's (selective AC)
    doc_tokens: int | None = None  # mean packed document under varlen attention; None: the whole sequence
    note: str = ""  # how the run differs from what ltune models

    def profile(self) -> ModelProfile:
        """The run's model: a named profile (load_model), or the stand-in the run carries."""
        return self.model if isinstance(self.model, ModelProfile) else load_model(self.model)


# ------------------------------------------------------------------------------------ torchtitan
_TT_H100 = (
    "pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md: Grand Teton, H100 96GB HBM2e at the "
    "default 500 W (not the 700 W SXM h100-80g profile), 400 Gb/s RDMA per GPU, bf16, no torch.compile, "
    "seq_len 8192 (llama3_8b.toml), local batch size 2, selective activation checkpointing"
)
_TT_A100 = (
    "pytorch/torchtitan docs/performance.md (2024 version, commit 0413364): 64 A100 80GB, FSDP2 (1D), "
    "bf16, seq_len 8192 for Llama 3 and 4096 for Llama 2 (the doc says so)"
)
#: torchtitan's selective 'op' checkpointing saves the attention output and every other matmul
#: output, recomputing the rest; selective 'layer' (ac_freq 2) recomputes every other layer:
#: both about half of the forward, modelled as a recompute share of 0.5
_SAC = 0.5

_TORCHTITAN = (
    PublishedRun(
        "torchtitan Llama3.1-8B 8k 8xH100 FSDP", "torchtitan", "llama3.1-8b", "h100-80g", 8192,
        Layout(num_gpus=8, zero_stage=3, recompute="full", micro_batch_size=2), 5762,
        source=f"{_TT_H100}; table 1, FSDP row", recomputed=_SAC,
    ),
    PublishedRun(
        "torchtitan Llama3.1-8B 8k 128xH100 FSDP", "torchtitan", "llama3.1-8b", "h100-80g", 8192,
        Layout(num_gpus=128, zero_stage=3, recompute="full", micro_batch_size=2), 5605,
        source=f"{_TT_H100}; table 3, FSDP row (16 nodes)", recomputed=_SAC,
    ),
    PublishedRun(
        "torchtitan Llama3-8B 8k 64xA100 SAC-layer", "torchtitan", "llama3.1-8b", "a100-80g", 8192,
        Layout(num_gpus=64, zero_stage=3, recompute="full", micro_batch_size=1), 2904,
        source=f"{_TT_A100}; Llama 3 table, 8B, batch 1, selective layer", recomputed=_SAC,
        note="the A100 cluster's inter-node network is not stated (the a100-80g profile assumes 200 Gb/s per GPU)",
    ),
    PublishedRun(
        "torchtitan Llama3-8B 8k 64xA100 SAC-op", "torchtitan", "llama3.1-8b", "a100-80g", 8192,
        Layout(num_gpus=64, zero_stage=3, recompute="full", micro_batch_size=1), 2973,
        source=f"{_TT_A100}; Llama 3 table, 8B, batch 1, selective op", recomputed=_SAC,
    ),
    PublishedRun(
        "torchtitan Llama3-70B 8k 64xA100 full AC", "torchtitan", "llama3.1-70b", "a100-80g", 8192,
        Layout(num_gpus=64, zero_stage=3, recompute="full", micro_batch_size=1), 331,
        source=f"{_TT_A100}; Llama 3 table, 70B, batch 1, full",
    ),
    PublishedRun(
        "torchtitan Llama2-13B 4k 64xA100 no AC", "torchtitan", "llama2-13b", "a100-80g", 4096,
        Layout(num_gpus=64, zero_stage=3, recompute="none", micro_batch_size=2), 2162,
        source=f"{_TT_A100}; Llama 2 table, 13B, batch 2, no checkpointing",
    ),
    PublishedRun(
        "torchtitan Llama2-13B 4k 64xA100 SAC-op", "torchtitan", "llama2-13b", "a100-80g", 4096,
        Layout(num_gpus=64, zero_stage=3, recompute="full", micro_batch_size=2), 1904,
        source=f"{_TT_A100}; Llama 2 table, 13B, batch 2, selective op", recomputed=_SAC,
    ),
    PublishedRun(
        "torchtitan Llama2-70B 4k 64xA100 full AC", "torchtitan", "llama2-70b", "a100-80g", 4096,
        Layout(num_gpus=64, zero_stage=3, recompute="full", micro_batch_size=2), 353,
        source=f"{_TT_A100}; Llama 2 table, 70B, batch 2, full",
    ),
)

# ---------------------------------------------------------------------------------------- XTuner
_XTUNER = (
    "InternLM/xtuner speed benchmark (docs/zh_cn/acceleration/benchmark.rst, xtuner.readthedocs.io "
    "zh-cn legacy/acceleration/benchmark): A100-SXM4-80GB, PyTorch 1.13, Alpaca packed to max_length, "
    "batch 1 per GPU, gradient checkpointing, fp16 AMP, DeepSpeed ZeRO-3 with XTuner's Ulysses sequence "
    "parallel, accumulative_counts = sequence_parallel_size (configs/llama_speed_benchmark)"
)
#: why the XTuner runs are modelled with attention over the whole packed sequence
_XTUNER_NOTE = (
    "the TFLOPs column (XTuner's ThroughputHook: causal attention over the whole packed sequence, recompute "
    "counted) stays 145-240 from 8k to 1M, which only full-sequence attention work explains: modelled with "
    "doc_tokens = seq_len; the ZeRO stage and the cluster's inter-node network are not stated"
)


def _xtuner(model: str, seq_len: int, gpus: int, sp: int, tgs: float, row: str) -> PublishedRun:
    """One row of XTuner's speed table."""
    return PublishedRun(
        f"XTuner {row} {gpus}xA100 sp{sp}", "xtuner", model, "a100-80g", seq_len,
        Layout(num_gpus=gpus, zero_stage=3, sp_degree=sp, recompute="full"), tgs,
        source=f"{_XTUNER}; row {row}, {gpus} GPUs, sp {sp}: {tgs} TGS", grad_accum=sp, note=_XTUNER_NOTE,
    )


_XTUNER_8K = _xtuner("llama2-7b", 8192, 8, 1, 3028.3, "Llama2-7B 8k")

# --------------------------------------------------------------------------------------- ms-swift
_SWIFT = PublishedRun(
    "ms-swift Qwen2.5-7B 16k 4xH20 ZeRO-3 FA2", "ms-swift", "qwen2.5-7b", "h20", 16384,
    Layout(num_gpus=4, zero_stage=3, recompute="full"), 4 * 16384 / 35.5,
    source="modelscope/ms-swift examples/train/flash_attention_3/transformers.sh: 4x H20, full fine-tuning, "
    "LongAlpaca-12k packed to max_length 16384, per-device batch 1, gradient accumulation 4, DeepSpeed ZeRO-3, "
    "bf16, Liger kernels, flash-attention 2: 35.5 s/it (swift's default gradient checkpointing)",
    grad_accum=4,
    note="the mean LongAlpaca-12k document is not published: modelled as one document per sequence (an upper "
    "bound on attention); the h20 profile's matmul and attention rates are scaled from H100, not measured; "
    "the same script's flash-attention 3 figure (32.4 s/it) is left out: ltune models FA2 only",
)

# -------------------------------------------------------------------------- MosaicML llm-foundry
_MOSAIC = (
    "mosaicml/llm-foundry scripts/train/benchmarking/README.md (commit c90b9b3), table 'A100 80GB with 1600 Gbps "
    "node-node interconnect (RoCE)': MPT models trained with Composer, FSDP FULL_SHARD (ZeRO-3), C4 packed to "
    "SeqLen, 8 A100 80GB per node, 1600 Gb/s per node (200 Gb/s per GPU, the a100-80g profile's NIC)"
)
_MOSAIC_H100 = (
    "mosaicml/llm-foundry scripts/train/benchmarking/README.md (commit 061f2c7), table 'H100 80GB BF16': MPT models "
    "trained with Composer, FSDP FULL_SHARD (ZeRO-3), amp_bf16, 8 GPUs per node (h100_80gb: planned as the h100-80g "
    "SXM5 profile; the table states no interconnect, the profile's 400 Gb/s NIC per GPU is assumed)"
)
#: MPT's shapes (llm-foundry scripts/train/yamls/pretrain/mpt-<size>.yaml): d_model, n_heads, n_layers;
#: every MPT has expansion_ratio 4 and vocab_size 50368, and the README's NumParams column equals
#: 12*L*d^2 + 50368*d + SeqLen*d (learned positions) + (13*L + 2)*d (biases and LayerNorms) for each
_MPT_SHAPES = {"1b": (2048, 16, 24), "3b": (2560, 20, 32), "7b": (4096, 32, 32), "13b": (5120, 40, 40),
               "30b": (7168, 56, 48), "70b": (8192, 64, 80)}
_MPT_NOTE = (
    "MPT described as a llama stand-in of the same parameter count and FLOPs: MPT's MLP is a non-gated 4x GELU "
    "(8*d^2 per layer), the stand-in's a gated one of width round(8d/3) (3*d*width, within 0.003%), multi-head "
    "attention of the same heads, tied 50368-token embedding; MPT's biases, LayerNorms and learned positions "
    "(SeqLen*d, a lookup: no matmul FLOPs) are left out (under 0.3% of the parameters at 8k). Composer's "
    "DEFAULT mixed precision reduces gradients in fp32 ('PURE': in bf16), ltune counts bf16 traffic; the "
    "table does not state the attention implementation (Triton or CUDA FlashAttention) nor the MFU's model"
)


def mpt_standin(size: str) -> ModelProfile:
    """A llama-shaped stand-in for MPT-<size>: MPT's d_model, heads and layers (mpt-<size>.yaml), a gated MLP of
    round(8d/3) (the parameters and FLOPs of MPT's 4d non-gated MLP), tied 50368-token embedding."""
    d, heads, layers = _MPT_SHAPES[size]
    return ModelProfile(
        name=f"mpt-{size}-standin", family="llama", hidden_size=d, num_layers=layers, num_attention_heads=heads,
        num_kv_heads=heads, intermediate_size=round(8 * d / 3), vocab_size=50368, tie_word_embeddings=True,
        max_position_embeddings=65536,
        source=f"llm-foundry scripts/train/yamls/pretrain/mpt-{size}.yaml shapes, as a llama stand-in: {_MPT_NOTE}",
    )


def _mosaic(size: str, seq_len: int, gpus: int, mb: int, accum: int, ckpt: bool, tps: float, mp: str,
            gpu: str = "a100-80g") -> PublishedRun:
    """One row of llm-foundry's A100 80GB (or H100 80GB BF16) table: MicroBatchSize, GradAccum, Activation
    Checkpointing (Composer's FSDP checkpointing of every MPT block: full recompute), Throughput (T/s/GPU) as
    published."""
    h100 = gpu == "h100-80g"
    return PublishedRun(
        f"MosaicML MPT-{size} {seq_len // 1024}k {gpus}x{'H100' if h100 else 'A100'} {'AC' if ckpt else 'no AC'}",
        "mosaicml", mpt_standin(size), gpu, seq_len,
        Layout(num_gpus=gpus, zero_stage=3, recompute="full" if ckpt else "none", micro_batch_size=mb), tps,
        source=f"{_MOSAIC_H100 if h100 else _MOSAIC}; row {size}, SeqLen {seq_len}, {gpus} GPUs, MicroBatchSize {mb}, "
        f"GradAccum {accum}, {mp}, Activation Checkpointing {ckpt}: {tps:g} T/s/GPU",
        grad_accum=accum, note=_MPT_NOTE,
    )


#: every row of the A100 80GB table for the sizes ltune plans (7B and up: the smaller MPTs' norms,
#: activations and optimizer step, which no term counts, weigh more) at SeqLen 2048-8192 (the other
#: sources' range; longer rows depend on the unstated attention implementation)
_MOSAICML = (
    _mosaic("70b", 2048, 64, 8, 4, True, 410, "bf16 PURE"),
    _mosaic("70b", 2048, 32, 2, 16, True, 373, "bf16 PURE"),
    _mosaic("30b", 8192, 8, 1, 21, True, 574, "amp_bf16 DEFAULT"),
    _mosaic("30b", 4096, 8, 1, 21, True, 814, "amp_bf16 DEFAULT"),
    _mosaic("30b", 2048, 8, 3, 21, True, 916, "amp_bf16 DEFAULT"),
    _mosaic("13b", 8192, 8, 5, 3, True, 1795, "amp_bf16 DEFAULT"),
    _mosaic("13b", 4096, 8, 10, 3, True, 2060, "amp_bf16 DEFAULT"),
    _mosaic("13b", 2048, 8, 2, 3, False, 2262, "amp_bf16 DEFAULT"),
    _mosaic("7b", 8192, 8, 8, 2, True, 3206, "amp_bf16 DEFAULT"),
    _mosaic("7b", 4096, 8, 16, 2, True, 3684, "amp_bf16 DEFAULT"),
    _mosaic("7b", 2048, 8, 6, 2, False, 4641, "amp_bf16 DEFAULT"),
)

#: the runs the fitted constants (MATMUL_EFFICIENCY, ELEMENTWISE_PASSES, ZERO3_OVERLAP) are fitted on: runs on GPUs
#: whose profile describes them (A100-SXM4-80GB: measured MAMF, published FlashAttention-2 rate)
FITTED_RUNS = (*(r for r in _TORCHTITAN if r.gpu == "a100-80g"), _XTUNER_8K, *_MOSAICML)

#: published runs on GPUs no profile describes, printed and tested for what they can test but in
#: no fit: torchtitan's H100s are 96GB HBM2e parts capped at 500 W (their matmul rate is unpublished;
#: the h100-80g profile is the 700 W SXM5); the H20's matmul and attention rates are assumed from
#: H100 (no MAMF or FlashAttention benchmark published for it)
UNPROFILED_RUNS = (*(r for r in _TORCHTITAN if r.gpu != "a100-80g"), _SWIFT)

#: XTuner's published throughput beyond the 8k row: never in any fit, an independent check
HELD_OUT_RUNS = (
    _xtuner("llama2-7b", 32768, 8, 1, 2234.2, "Llama2-7B 32k"),
    _xtuner("llama2-7b", 131072, 8, 8, 948.6, "Llama2-7B 128k"),
    _xtuner("llama2-7b", 262144, 8, 8, 540.1, "Llama2-7B 256k"),
    _xtuner("llama2-7b", 1048576, 32, 16, 133.6, "Llama2-7B 1M"),
    _xtuner("yi-34b", 8192, 32, 1, 485.1, "Yi-34B-200K 8k"),
    _xtuner("yi-34b", 32768, 32, 2, 491.5, "Yi-34B-200K 32k"),
    _xtuner("yi-34b", 131072, 32, 8, 251.1, "Yi-34B-200K 128k"),
    _xtuner("yi-34b", 262144, 32, 8, 119.7, "Yi-34B-200K 256k"),
    _xtuner("llama2-70b", 8192, 32, 1, 216.8, "Llama2-70B 8k"),
    _xtuner("llama2-70b", 32768, 32, 4, 300.9, "Llama2-70B 32k"),
    _xtuner("llama2-70b", 131072, 32, 8, 144.7, "Llama2-70B 128k"),
    _xtuner("llama2-70b", 262144, 32, 16, 63.8, "Llama2-70B 256k"),
    _xtuner("llama2-70b", 1048576, 64, 64, 21.8, "Llama2-70B 1M"),
)

#: more rows of llm-foundry's benchmark table, never in any fit, chosen by the fitted rows' rule (SeqLen
#: 2048-8192) before any was predicted: every H100 80GB BF16 row of MPT-7B and up (the fit's A100 constants
#: carried to another GPU: its MAMF, HBM bandwidth and FlashAttention rate), and every A100 80GB row of MPT-1B
#: and 3B (narrow models, where memory-bound work weighs more against the matmuls)
HELD_OUT_MOSAICML = (
    _mosaic("70b", 2048, 64, 8, 4, True, 1039, "amp_bf16 DEFAULT", "h100-80g"),
    _mosaic("70b", 2048, 32, 2, 16, True, 882, "amp_bf16 DEFAULT", "h100-80g"),
    _mosaic("30b", 8192, 8, 1, 21, True, 1384, "amp_bf16 DEFAULT", "h100-80g"),
    _mosaic("30b", 4096, 8, 1, 21, True, 1802, "amp_bf16 DEFAULT", "h100-80g"),
    _mosaic("30b", 2048, 32, 14, 3, True, 2308, "amp_bf16 DEFAULT", "h100-80g"),
    _mosaic("30b", 2048, 16, 10, 3, True, 2263, "amp_bf16 DEFAULT", "h100-80g"),
    _mosaic("30b", 2048, 8, 3, 21, True, 2002, "amp_bf16 DEFAULT", "h100-80g"),
    _mosaic("13b", 4096, 8, 10, 3, True, 4717, "amp_bf16 DEFAULT", "h100-80g"),
    _mosaic("13b", 2048, 64, 2, 1, False, 4800, "amp_bf16 DEFAULT", "h100-80g"),
    _mosaic("13b", 2048, 32, 2, 1, False, 4811, "amp_bf16 DEFAULT", "h100-80g"),
    _mosaic("13b", 2048, 16, 2, 1, False, 4767, "amp_bf16 DEFAULT", "h100-80g"),
    _mosaic("13b", 2048, 8, 2, 1, False, 4792, "amp_bf16 DEFAULT", "h100-80g"),
    _mosaic("7b", 8192, 8, 8, 2, True, 6935, "amp_bf16 DEFAULT", "h100-80g"),
    _mosaic("7b", 4096, 8, 16, 2, True, 8611, "amp_bf16 DEFAULT", "h100-80g"),
    _mosaic("7b", 2048, 8, 6, 1, False, 10643, "amp_bf16 DEFAULT", "h100-80g"),
    _mosaic("3b", 8192, 8, 3, 6, False, 7695, "amp_bf16 DEFAULT"),
    _mosaic("3b", 4096, 8, 5, 6, False, 9457, "amp_bf16 DEFAULT"),
    _mosaic("3b", 2048, 8, 10, 2, False, 10811, "amp_bf16 DEFAULT"),
    _mosaic("1b", 8192, 8, 3, 4, False, 13814, "amp_bf16 DEFAULT"),
    _mosaic("1b", 4096, 8, 7, 4, False, 17807, "amp_bf16 DEFAULT"),
    _mosaic("1b", 2048, 8, 14, 4, False, 20513, "amp_bf16 DEFAULT"),
)

ALL_RUNS = (*FITTED_RUNS, *UNPROFILED_RUNS, *HELD_OUT_RUNS, *HELD_OUT_MOSAICML)
