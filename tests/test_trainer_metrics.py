"""Metrics and schedule: FLOPs per token as the planner counts them, warmup then cosine."""

from __future__ import annotations

import math

import pytest

from ltune.trainer.engine import lr_factor, param_groups
from ltune.trainer.metrics import flops_per_token, predicted


def test_flops_per_token_agrees_with_the_planner(plan_factory):
    from ltune.planner.shape import Shape
    from ltune.planner.throughput import model_flops_per_token

    arch = plan_factory().model.architecture
    for seq_len in (256, 32768):
        assert flops_per_token(arch, seq_len) == model_flops_per_token(Shape.of(arch, seq_len))


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


def test_prediction_falls_back_to_the_fit_check(plan_factory):
    plan = plan_factory(layout={"num_gpus": 2, "zero_stage": 3})
    pred = predicted(plan)
    assert pred["predicted_peak_bytes"] > 0 and pred["predicted_tokens_per_s_per_gpu"] > 0
