"""Step time of mixture-of-experts models against hand counts: matmuls over the ACTIVE parameters
(attention, router, top-k routed experts, shared experts, dense layers), MLA's narrower value heads in
attention, MFU as 6 x active + attention, ZeRO traffic over the TOTAL parameters (every expert), and the
command line showing active parameters and a communication-bound step."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import ltune.cli
import ltune.planner.options
from ltune.cli import app
from ltune.planner import throughput as T
from ltune.planner.schema import Layout
from ltune.planner.shape import Shape
from ltune.profiles import load_gpu, load_model
from ltune.profiles.schema import ModelProfile

runner = CliRunner()

# A tiny Mixtral: hidden 64, 2 layers, 4 heads of 16 (q 64), 2 kv heads (kv 32), 4 experts of width 32, top-2,
# vocab 384. Per layer, by hand: q 64x64 + k 64x32 + v 64x32 + o 64x64 = 12,288; 2 RMSNorms 128; router 4x64 = 256;
# one expert gate 64x32 + up 64x32 + down 32x64 = 6,144.
ATTN, NORMS, EXPERT, HEAD = 12_288, 128, 6_144, 384 * 64


def _tiny_mixtral(num_experts: int = 4, top_k: int = 2, **kw) -> ModelProfile:
    return ModelProfile(name="tiny-mixtral", source="test", family="mixtral", hidden_size=64, num_layers=2,
                        num_attention_heads=4, num_kv_heads=2, intermediate_size=32, vocab_size=384,
                        num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=32, **kw)


# A tiny DeepSeek-V2: hidden 64, 3 layers (layer 0 dense, MLP 96), 4 heads, MLA with kv rank 16, q/k heads
# 16 nope + 8 rope = 24 wide, v heads 8 wide; 4 routed experts of 32, top-2, 1 shared expert of 32; vocab 384.
# MLA per layer: q_proj 64 x 4*24 = 6,144; kv_a_proj_with_mqa 64 x (16+8) = 1,536; kv_a_layernorm 16;
# kv_b_proj 16 x 4*(16+8) = 1,536; o_proj 4*8 x 64 = 2,048: 11,280.
MLA = 6_144 + 1_536 + 16 + 1_536 + 2_048
DENSE_MLP = 3 * 64 * 96
SHARED = 3 * 64 * 32


def _tiny_deepseek() -> ModelProfile:
    return ModelProfile(name="tiny-deepseek", source="test", family="deepseek_v2", hidden_size=64, num_layers=3,
                        num_attention_heads=4, num_kv_heads=4, intermediate_size=96, vocab_size=384,
                        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_shared_experts=1,
                        dense_layers=(0,), kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=8)


def test_tiny_mixtral_matmul_flops_by_hand():
    """6 per active weight and token: attention, norms, router, 2 of the 4 experts; the output head 6 x 384 x 64."""
    active_layer = ATTN + NORMS + 256 + 2 * EXPERT  # 24,960
    s = Shape.of(_tiny_mixtral(), 256)
    assert T.matmul_flops_per_token(s, 0.0) == 6 * 2 * active_layer + 6 * HEAD == 446_976
    # a recomputed forward: 2 per active layer weight (the head is not checkpointed)
    assert T.matmul_flops_per_token(s, 1.0) - T.matmul_flops_per_token(s, 0.0) == 2 * 2 * active_layer


def test_tiny_deepseek_matmul_flops_by_hand():
    """Dense layer 0 whole; MoE layers: MLA, norms, router, 2 routed experts and the shared one."""
    dense_layer = MLA + NORMS + DENSE_MLP                      # 29,840
    moe_layer = MLA + NORMS + 256 + 2 * EXPERT + SHARED        # 30,096
    s = Shape.of(_tiny_deepseek(), 256)
    assert T.matmul_flops_per_token(s, 0.0) == 6 * (dense_layer + 2 * moe_layer) + 6 * HEAD == 687_648
    # the same count as the profile's active parameters (embedding, final norm and head besides the layers)
    assert T.active_layers_params(s) + 2 * HEAD + 64 == _tiny_deepseek().active_params()


def test_mla_attention_uses_value_head_size():
    """MLA: QK^T over 4 heads x 24, PV over 4 heads x 8; causal flash forward d x (q + v) per layer,
    backward 2.5x; PaLM's MFU term 6 x L x T x (q + v), no causal halving."""
    s = Shape.of(_tiny_deepseek(), 256)
    fwd = 256 * (4 * 24 + 4 * 8)
    assert T.attention_flops_per_token(s, "varlen", 0.0) == 3 * fwd * 3.5 == 344_064
    assert T.attention_flops_per_token(s, "eager", 1.0) == 3 * 2 * fwd * 4.5
    active = MLA * 3 + NORMS * 3 + DENSE_MLP + 2 * (256 + 2 * EXPERT + SHARED) + 2 * HEAD + 64
    assert T.model_flops_per_token(s) == 6 * active + 6 * 3 * 256 * (96 + 32)


def test_mfu_counts_active_params():
    """Mixtral-style MFU: 6 x active + 12 L q T (the model card's 12.9B of 46.7B, not the total)."""
    s = Shape.of(_tiny_mixtral(), 256)
    active = 2 * (ATTN + NORMS + 256 + 2 * EXPERT) + 2 * HEAD + 64
    assert T.model_flops_per_token(s) == 6 * active + 12 * 2 * 64 * 256 == 988_032
    assert s.params - active == 2 * 2 * EXPERT  # the two experts a token skips in each layer


def test_more_experts_raise_communication_not_compute():
    """Mixtral-8x7B's shape at 2k on 16 H100s (2 nodes), ZeRO-3: doubling the experts at top-2 adds
    only the router's 8 x 4096 per layer to compute, while ZeRO-3 moves every expert: 3 passes of
    the bf16 total over the ring (15/16 of it per link) at the node's 8 NICs of 46 GB/s together."""
    gpu = load_gpu("h100-80g")
    lay = Layout(num_gpus=16, zero_stage=3, micro_batch_size=1, recompute="full")
    s8, s16 = (Shape.of(_mixtral(e), 2048) for e in (8, 16))
    assert s8.params == 46_702_792_704 and s8.active_params == 12_879_925_248  # Mixtral card: 46.7B, 12.9B active
    router = 32 * 8 * 4096
    assert T.matmul_flops_per_token(s16, 1.0) - T.matmul_flops_per_token(s8, 1.0) == 8 * router
    comm8 = T.zero_comm_seconds(s8, lay, gpu)[0]
    assert comm8 == pytest.approx(3 * 2 * 46_702_792_704 * 15 / 16 / (8 * 46e9), rel=1e-12)
    th8, th16 = (T.estimate_throughput(s, lay, gpu) for s in (s8, s16))
    assert th16.compute_s == pytest.approx(th8.compute_s, rel=1e-4)
    assert th16.exposed_comm_s > 1.8 * th8.exposed_comm_s
    assert th8.exposed_comm_s > th8.compute_s  # communication-bound: 2048 tokens a rank of 12.9B active


def _mixtral(num_experts: int = 8) -> ModelProfile:
    """Mixtral-8x7B-v0.1's config.json (32 layers, hidden 4096, 32/8 heads, experts 14336 wide, top-2)."""
    return ModelProfile(name="mixtral-like", source="mistralai/Mixtral-8x7B-v0.1 config.json", family="mixtral",
                        hidden_size=4096, num_layers=32, num_attention_heads=32, num_kv_heads=8,
                        intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768, rope_theta=1e6,
                        num_experts=num_experts, num_experts_per_tok=2, moe_intermediate_size=14336)


@pytest.fixture
def mixtral_flag(monkeypatch):
    """--model mixtral-like resolves to the Mixtral shape (until a profile / config.json import exists)."""
    real = ltune.planner.options.resolve_model
    monkeypatch.setattr(ltune.planner.options, "resolve_model",
                        lambda spec: _mixtral() if spec == "mixtral-like" else real(spec))


PLAN_16 = ["plan", "-m", "mixtral-like", "--ctx", "2k", "--gpu", "h100-80g", "--gpus", "16", "--micro-batch", "1"]


def test_cli_shows_active_params_and_communication_bound(mixtral_flag):
    result = runner.invoke(app, PLAN_16, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "46.70B params, 12.88B active (top-2 of 8 experts)" in result.stdout
    bound = next(line for line in result.stdout.splitlines() if "communication-bound" in line)
    assert "ZeRO-3" in bound and "across nodes" in bound and "12.88B active" in bound


def test_communication_bound_line_threshold():
    """'communication-bound' exactly when the exposed communication exceeds the compute of the step."""
    from types import SimpleNamespace

    from ltune.planner.schema import Throughput
    from ltune.render import communication_bound_line

    gpu = load_gpu("h100-80g")
    lay = Layout(num_gpus=8, zero_stage=3, micro_batch_size=1, recompute="full")

    def ev(exposed: float, compute: float):
        th = Throughput(step_time_s=exposed + compute, tokens_per_s_per_gpu=1.0, mfu=0.1, compute_s=compute,
                        exposed_comm_s=exposed, flops_per_token=1.0)
        return SimpleNamespace(throughput=th, layout=lay)

    line = communication_bound_line(ev(1.01, 1.00), _mixtral(), gpu)
    assert line.startswith("communication-bound: exposed communication 1.01 s > compute 1.00 s per step; ZeRO-3")
    assert "inside one node" in line and "46.70B params" in line and "12.88B active" in line
    assert communication_bound_line(ev(0.99, 1.00), _mixtral(), gpu) is None


def test_cli_json_active_params_and_exposed_comm(mixtral_flag):
    result = runner.invoke(app, [*PLAN_16, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["params"], out["active_params"]) == (46_702_792_704, 12_879_925_248)
    assert out["communication_bound"] is True
    assert out["throughput"]["exposed_comm_s"] > out["throughput"]["compute_s"]
    layouts = out["runners_up"] + [pc["best"] for pc in out["per_count"] if pc["best"]]
    assert layouts and all(ev["active_params"] == 12_879_925_248 for ev in layouts)
    assert all(ev["communication_bound"] == (ev["throughput"]["exposed_comm_s"] > ev["throughput"]["compute_s"])
               for ev in layouts)


def test_cli_dense_plan_has_no_communication_line():
    """A dense model: active = all parameters, and no MoE wording: its text output is as before MoE, even
    for a communication-bound layout (512 tokens a rank, ZeRO-3 over 2 nodes; --json flags it)."""
    args = ["plan", "-m", "llama3.1-8b", "--ctx", "512", "--gpu", "h100-80g", "--gpus", "16", "--zero-stage", "3",
            "--micro-batch", "1"]
    out = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert out["active_params"] == out["params"] == 8_030_261_248
    assert out["communication_bound"] is True
    text = runner.invoke(app, args, env={"COLUMNS": "400"}).stdout
    assert "(8.03B params, 32 layers" in text and "active" not in text and "communication-bound" not in text


def test_cli_models_lists_active_params(monkeypatch):
    monkeypatch.setattr(ltune.cli, "model_names", lambda: ["llama3.1-8b", "mixtral-like"])
    real = ltune.cli.load_model
    monkeypatch.setattr(ltune.cli, "load_model", lambda n: _mixtral() if n == "mixtral-like" else real(n))
    result = runner.invoke(app, ["models"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "mixtral-like" in line)
    assert "46.70B" in row and "12.88B (2 of 8)" in row
    # dense profiles only: the listing as before mixture-of-experts models (no active column)
    monkeypatch.setattr(ltune.cli, "model_names", lambda: ["llama3.1-8b"])
    dense = runner.invoke(app, ["models"], env={"COLUMNS": "400"}).stdout
    assert "active" not in dense and "8.03B" in dense


def test_cli_mixtral_profile():
    """The mixtral-8x7b profile through `ltune plan` and `ltune models` (model card: 46.7B params, 12.9B active)."""
    plan = runner.invoke(app, ["plan", "-m", "mixtral-8x7b", "--ctx", "2k", "--gpu", "h100-80g", "--gpus", "16",
                               "--micro-batch", "1"], env={"COLUMNS": "400"})
    assert plan.exit_code == 0, plan.output
    assert "mixtral-8x7b (46.70B params, 12.88B active (top-2 of 8 experts)" in plan.stdout
    assert "communication-bound: exposed communication" in plan.stdout
    listing = runner.invoke(app, ["models"], env={"COLUMNS": "400"})
    row = next(line for line in listing.stdout.splitlines() if "mixtral-8x7b" in line)
    assert "12.88B (2 of 8)" in row
    dense = next(line for line in listing.stdout.splitlines() if "llama3.1-8b" in line)
    assert "12.88B" not in dense and " all " in dense


@pytest.mark.parametrize("name, width", [
    ("mixtral-8x7b", 2 * 14336),                         # top-2 of experts 14336 wide, every layer
    ("qwen1.5-moe-a2.7b", 4 * 1408 + 5632),             # top-4 of 1408, shared expert 5632
    ("deepseek-v2-lite", (26 * (6 * 1408 + 2 * 1408) + 10944) / 27),  # layer 0 dense (10944); 26 MoE: top-6 + 2 shared
    ("llama3.1-8b", 14336),
])
def test_memory_bound_work_follows_the_mlp_a_token_runs(name, width):
    """The memory-bound term counts the MLP width one token runs (config.json of each model)."""
    assert T.mlp_width_per_token(Shape.of(load_model(name), 4096)) == pytest.approx(width, rel=1e-12)
