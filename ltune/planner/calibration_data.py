"""Published training throughput, with sources: the runs the step-time model's constants
(throughput.MATMUL_EFFICIENCY, ZERO3_OVERLAP) are fitted on, runs on GPUs no profile describes, and
XTuner's runs beyond 8k, held out of every fit as an independent check (bench/calibration.py prints all;
tests/test_planner_throughput.py tests them). The only copy of these figures: every number below
was read in its source, none is derived from another run."""

from __future__ import annotations

from dataclasses import dataclass

from .schema import Layout


@dataclass(frozen=True)
class PublishedRun:
    """One public training run, described as ltune's layout, and its measured speed."""

    label: str
    origin: str  # the independent source (one team's benchmark): the unit left out of a fit
    model: str  # model profile name
    gpu: str  # GPU profile name
    seq_len: int
    layout: Layout
    tokens_per_s_per_gpu: float  # measured
    source: str
    grad_accum: int = 1  # micro-batches per optimizer step
    recomputed: float | None = None  # share of the forward recomputed, when not the layout's (selective AC)
    doc_tokens: int | None = None  # mean packed document under varlen attention; None: the whole sequence
    note: str = ""  # how the run differs from what ltune models


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

#: the runs the fitted constants (MATMUL_EFFICIENCY, ZERO3_OVERLAP) are fitted on: runs on GPUs
#: whose profile describes them (A100-SXM4-80GB: measured MAMF, published FlashAttention-2 rate)
FITTED_RUNS = (*(r for r in _TORCHTITAN if r.gpu == "a100-80g"), _XTUNER_8K)

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

ALL_RUNS = (*FITTED_RUNS, *UNPROFILED_RUNS, *HELD_OUT_RUNS)
