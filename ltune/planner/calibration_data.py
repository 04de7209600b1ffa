"""Published training throughput, with sources: the runs the step-time model's
KERNEL_EFFICIENCY is fitted on (bench/calibration.py prints the fit) and runs held out of
the fit, which test it (tests/test_planner_search.py). The only copy of these figures."""

from __future__ import annotations

from dataclasses import dataclass

from .schema import Layout


@dataclass(frozen=True)
class PublishedRun:
    """One public training run, described as ltune's layout, and its measured speed."""

    label: str
    model: str  # model profile name
    gpu: str  # GPU profile name
    seq_len: int
    layout: Layout
    tokens_per_s_per_gpu: float  # measured
    source: str
    grad_accum: int = 1  # micro-batches per optimizer step
    note: str = ""  # how the run differs from what ltune models


_TORCHTITAN = (
    "pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md: H100 96GB HBM2e at 500 W (not the SXM "
    "h100-80g profile), bf16, no torch.compile, local batch size 2, selective activation checkpointing "
    "(modelled as full recompute; ltune has no selective recompute)"
)

#: the runs KERNEL_EFFICIENCY is the geometric-mean fit of
FITTED_RUNS = (
    PublishedRun(
        "torchtitan Llama-3.1-8B 8k 8xH100 FSDP", "llama3.1-8b", "h100-80g", 8192,
        Layout(num_gpus=8, zero_stage=3, recompute="full", micro_batch_size=2), 5762,
        source=f"{_TORCHTITAN}; table 1, FSDP row",
    ),
    PublishedRun(
        "XTuner Llama2-7B 8k 8xA100 ZeRO-3", "llama2-7b", "a100-80g", 8192,
        Layout(num_gpus=8, zero_stage=3, recompute="full"), 3028,
        source="InternLM/xtuner README speed benchmark (packed, batch 1)",
        note="packs short samples under varlen attention: less attention work than full-causal 8k",
    ),
)

#: runs not used in the fit
HELD_OUT_RUNS = (
    PublishedRun(
        "torchtitan Llama-3.1-8B 8k 128xH100 FSDP", "llama3.1-8b", "h100-80g", 8192,
        Layout(num_gpus=128, zero_stage=3, recompute="full", micro_batch_size=2), 5605,
        source=f"{_TORCHTITAN}; table 3, FSDP row (16 nodes, 400 Gb/s per GPU)",
        note="same software and GPUs as the fitted torchtitan run: it tests the scaling to 16 nodes "
        "(inter-node ZeRO-3 traffic) more than the per-GPU efficiency",
    ),
    PublishedRun(
        "ms-swift Qwen2.5-7B 16k 4xH20 ZeRO-3", "qwen2.5-7b", "h20", 16384,
        Layout(num_gpus=4, zero_stage=3, recompute="full"), 4 * 16384 / 35.5,
        source="modelscope/ms-swift examples/train/flash_attention_3/transformers.sh: 4x H20, full fine-tuning, "
        "packing to max_length 16384, per-device batch 1, gradient accumulation 4, DeepSpeed ZeRO-3, "
        "flash-attention 2: 35.5 s/it (swift's default gradient checkpointing)",
        grad_accum=4,
        note="packs LongAlpaca-12k documents (less attention work than full-causal 16k) and uses Liger kernels; "
        "the h20 profile's matmul_efficiency is assumed, not measured",
    ),
)
