"""Metrics and schedule against numbers worked out by hand or held elsewhere: FLOPs per token
(PaLM), a step's tokens per second and MFU, the GPU profile's published peak, the prediction
logged beside the measurements (the plan's own, else the re-check against a trace of the same
step); warmup then cosine."""

from __future__ import annotations

import math

import pytest

from ltune.trainer.engine import lr_factor, param_groups
from ltune.trainer.metrics import flops_per_token, peak_flops_per_gpu, predicted, step_throughput

# conftest's tiny_arch, counted by hand: untied embedding and output head (vocab 384 x hidden 64);
# per layer q and o 64 x 64, k and v 64 x 32 (2 kv heads of 16), gate, up and down 64 x 128, two
# norms of 64; the final norm
TINY_PARAMS = 2 * 384 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64


def tiny_flops_per_token(seq_len: int) -> int:
    """PaLM (Chowdhery et al. 2022, appendix B): 6 N + 12 L H Q T, 2 layers of 4 heads of 16."""
    return 6 * TINY_PARAMS + 12 * 2 * 4 * 16 * seq_len


def test_flops_per_token_by_hand(plan_factory):
    arch = plan_factory().model.architecture
    assert TINY_PARAMS == 123_200
    assert flops_per_token(arch, 256) == tiny_flops_per_token(256) == 739_200 + 393_216
    assert flops_per_token(arch, 32768) == tiny_flops_per_token(32768)


def test_step_throughput_by_hand():
    # 8 sequences of 1024 tokens in 0.5 s on 4 GPUs: 8192 / 0.5 / 4 = 4096 tokens/s per GPU; at
    # 1e9 FLOPs a token that is 4.096e12 FLOP/s of a 16.384e12 peak: MFU 0.25
    tokens_per_s_per_gpu, mfu = step_throughput(8 * 1024, 0.5, 4, 1e9, 16.384e12)
    assert tokens_per_s_per_gpu == 4096.0
    assert mfu == pytest.approx(0.25, rel=1e-12)
    assert step_throughput(8 * 1024, 0.5, 4, 1e9, None) == (4096.0, None)  # unknown peak: no MFU


def test_peak_flops_is_the_published_dense_peak(plan_factory):
    # NVIDIA H100 SXM datasheet: 989 dense bf16 TFLOPS, 67 fp32 TFLOPS
    assert peak_flops_per_gpu(plan_factory(gpu="h100-80g")) == 989e12
    assert peak_flops_per_gpu(plan_factory(gpu="h100-80g", training={"precision": "fp32"})) == 67e12
    assert peak_flops_per_gpu(plan_factory(gpu="no-such-gpu")) is None


def test_warmup_then_cosine_to_zero():
    warmup, total = 10, 110
    factors = [lr_factor(s, warmup, total) for s in range(total)]
    assert factors[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert factors[warmup] == 1.0
    assert factors[warmup + 50] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1 :]))
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert lr_factor(0, 0, 5) == 1.0


def test_no_weight_decay_on_norms():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_prediction_is_the_plans_own(plan_factory):
    from ltune.planner.schema import Prediction

    memory = dict(terms={"weights": 123_456_789}, total_bytes=123_456_789, capacity_bytes=8 * 2**30,
                  usable_bytes=7 * 2**30, host_bytes_per_node=0, host_capacity_bytes_per_node=2**34)
    throughput = dict(step_time_s=2.0, tokens_per_s_per_gpu=1234.5, mfu=0.375, compute_s=1.5,
                      exposed_comm_s=0.5, flops_per_token=1e9)
    prediction = Prediction.model_validate({"memory": memory, "throughput": throughput, "safety_margin": 0.1})
    plan = plan_factory().model_copy(update={"prediction": prediction})
    assert predicted(plan) == {
        "predicted_peak_bytes": 123_456_789,
        "predicted_tokens_per_s_per_gpu": 1234.5,
        "predicted_mfu": 0.375,
    }


def test_prediction_falls_back_to_the_fit_check(plan_factory):
    """A plan without a prediction gets the planner's re-check: its peak against a trace of the
    same step (fake tensors, ltune.trace), its MFU against the FLOPs counted by hand."""
    pytest.importorskip("transformers")
    from ltune.trace import trace_plan_file

    plan = plan_factory(layout={"num_gpus": 1, "zero_stage": 0}, training={"precision": "fp32"})
    assert plan.prediction is None
    pred = predicted(plan)
    # the planner's accuracy goal is 3% of the traced allocations; its peak adds a reserve of 5%
    # of them for the allocator's fragmentation (the cpu profile has no CUDA context or NCCL buffers)
    traced = trace_plan_file(plan).peak_bytes
    assert pred["predicted_peak_bytes"] == pytest.approx(1.05 * traced, rel=0.03)
    # the cpu profile's fp32 peak is 0.25 TFLOPS
    expected_mfu = pred["predicted_tokens_per_s_per_gpu"] * tiny_flops_per_token(128) / 0.25e12
    assert pred["predicted_mfu"] == pytest.approx(expected_mfu, rel=1e-12)
