"""ltune.trace: the traced step is exact on what can be computed by hand, and the analytic model
stays within the accuracy goal (3%) of it on small real-shaped models."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ltune.planner.memory import estimate_memory  # noqa: E402
from ltune.planner.schema import Layout  # noqa: E402
from ltune.profiles import load_gpu, load_model  # noqa: E402
from conftest import tiny_arch  # noqa: E402
from ltune.trace import comparable_totals, trace_memory  # noqa: E402
from ltune.trace.flash import flash_attention_bytes, flash_varlen_memory  # noqa: E402
from ltune.planner.shape import Shape  # noqa: E402
from ltune.planner.zero import ParamPartition, model_state_bytes  # noqa: E402
from ltune.trace.tracer import trace_step  # noqa: E402
from ltune.trace.types import CATEGORIES  # noqa: E402

BLOCK = 512  # the CUDA caching allocator's smallest block


def _blocks(n_bytes: int) -> int:
    return math.ceil(n_bytes / BLOCK) * BLOCK


TINY = tiny_arch(hidden_size=128, num_layers=3, intermediate_size=352, vocab_size=512)


def _cat(values: tuple[int, ...], name: str) -> int:
    return values[CATEGORIES.index(name)]


@pytest.fixture(scope="module")
def tiny_trace():
    layout = Layout(num_gpus=1, zero_stage=0, recompute="full", loss="full")
    return trace_step(TINY, 256, layout, num_docs=2)


def test_model_states_are_exact(tiny_trace):
    """Parameters, gradients, fp32 masters and Adam moments: numel x dtype size, per tensor."""
    raw, m = tiny_trace, TINY
    h, ffn, q, kv, v = m.hidden_size, m.intermediate_size, m.q_size, m.kv_size, m.vocab_size
    layer = [h * q, h * kv, h * kv, q * h, h * ffn, h * ffn, ffn * h, h, h]
    numels = [v * h] + layer * m.num_layers + [h, v * h]
    assert raw.num_params == sum(numels) == m.num_params()
    assert sorted(raw.param_numels) == sorted(numels)
    start, after_bw = raw.timeline.marks["start"], raw.timeline.marks["after_backward"]
    assert _cat(start, "Parameter") == sum(_blocks(2 * n) for n in numels)
    assert _cat(start, "Other") == sum(_blocks(4 * n) for n in numels)  # fp32 master copies
    # two fp32 moments per tensor and fused AdamW's fp32 step counter (one 512 B block each)
    assert _cat(start, "Optstate") == sum(2 * _blocks(4 * n) + BLOCK for n in numels)
    assert _cat(after_bw, "Gradient") == sum(_blocks(2 * n) for n in numels)
    assert _cat(start, "Gradient") == 0 and _cat(raw.timeline.marks["end"], "Gradient") == 0


def test_checkpoints_and_full_loss_by_hand(tiny_trace):
    """Full recompute keeps each layer's 16-bit input; transformers-style full loss peaks at
    3 fp32 copies of the logits in its backward (log-probs, their gradient, the input gradient)."""
    from ltune.trace.sharding import shard

    layout = Layout(num_gpus=1, zero_stage=0, recompute="full", loss="full")
    res = shard(tiny_trace, "tiny", 256, layout, "bf16")
    t, h, v, d = 256, TINY.hidden_size, TINY.vocab_size, TINY.head_size
    # L layer inputs + the final norm's saved fp32 input, normalised and output (8h) and fp32
    # rsqrt(variance) (4 per token) + RoPE cos/sin
    expected = TINY.num_layers * 2 * t * h + 8 * t * h + 4 * t + 2 * 2 * t * d
    loss = res.phase_terms["loss"]
    assert loss["activations_checkpoints"] == expected
    assert 3 * 4 * t * v <= loss["logits_loss"] <= 3 * 4 * t * v + 4 * BLOCK


def test_flash_stand_in_saves_what_flash_attn_saves():
    from torch._subclasses.fake_tensor import FakeTensorMode

    tokens, heads, kv_heads, dim = 1024, 8, 2, 64
    with FakeTensorMode():
        q = torch.empty(tokens, heads, dim, dtype=torch.bfloat16, requires_grad=True)
        k = torch.empty(tokens, kv_heads, dim, dtype=torch.bfloat16, requires_grad=True)
        v = torch.empty(tokens, kv_heads, dim, dtype=torch.bfloat16, requires_grad=True)
        out = flash_varlen_memory(q, k, v, num_docs=3)
        saved = sum(t.numel() * t.element_size() for t in out.grad_fn.saved_tensors)
    expected = flash_attention_bytes(num_tokens=tokens, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, num_docs=3)
    assert saved == expected["saved_bytes"] + 16  # + flash's 2 x int64 RNG state
    assert out.shape == q.shape and out.dtype == q.dtype


def _per_tensor_states(numels, dtype_bytes, layout, precision, phase):
    partition = ParamPartition.of_tensors(numels, layout.num_gpus)
    return model_state_bytes(partition, dtype_bytes, layout, precision, phase)


def test_zero_partitioning_arithmetic():
    """DeepSpeed's split of each tensor, by hand: ZeRO-3 (partition_parameters.py) ceil(n / N) per
    tensor, whole at or below 1e5 elements; ZeRO 1-2 one flat group of ceil(P / N) per rank."""
    numels = [1000, 300_000, 50_000, 900_001]
    lay3 = Layout(num_gpus=8, zero_stage=3)
    states = _per_tensor_states(numels, 2, lay3, "bf16", "backward")
    # ZeRO-3: tensors <= 1e5 elements stay whole (persistence threshold), the others ceil(n / 8)
    assert states["weights"] == 2 * (1000 + 50_000 + 37_500 + 112_501)
    assert states["master_weights"] == 4 * (125 + 37_500 + 6_250 + 112_501)
    assert states["optimizer_states"] == 2 * states["master_weights"]
    lay1 = Layout(num_gpus=4, zero_stage=1)
    s1 = _per_tensor_states(numels, 2, lay1, "bf16", "step")
    assert s1["gradients"] == 2 * sum(numels) and s1["gradients_fp32"] == 4 * math.ceil(sum(numels) / 4)
    lay0 = Layout(num_gpus=4, zero_stage=0)
    # bf16 at ZeRO-0 is FP16_UnfusedOptimizer: whole master and moments, fp32 gradients at the step
    s0 = _per_tensor_states(numels, 2, lay0, "bf16", "backward")
    assert s0["master_weights"] == 4 * sum(numels) and s0["gradients_fp32"] == 0
    assert _per_tensor_states(numels, 2, lay0, "bf16", "step")["gradients_fp32"] == 4 * sum(numels)
    # fp32 at ZeRO-0: the bare optimizer, gradients on the parameters, no master copy
    f0 = _per_tensor_states(numels, 4, lay0, "fp32", "step")
    assert f0 == {"weights": 4 * sum(numels), "gradients": 4 * sum(numels), "gradients_fp32": 0,
                  "master_weights": 0, "optimizer_states": 8 * sum(numels)}


QWEN_SMALL = load_model("qwen2.5-0.5b").model_copy(update={"name": "qwen2.5-0.5b-4l", "num_layers": 4})


def test_planner_partition_matches_the_trainers_tensors():
    """The planner's aggregate numbers (Shape) against the trainer's real parameter tensors
    (built on meta: Qwen2.5 with q/k/v biases and tied embeddings): same parameter count, largest
    tensor and persistent (<= 1e5 elements, whole on every rank) tensors; the planner's P // N
    is at most one element per tensor below DeepSpeed's ceil(n / N) per tensor."""
    from ltune.trace.tracer import trace_plan
    from ltune.trainer.model import build_model

    with torch.device("meta"):
        model = build_model(trace_plan(QWEN_SMALL, 1024, Layout(num_gpus=8), "bf16", 512))
    numels = [p.numel() for p in model.parameters() if p.requires_grad]
    traced = ParamPartition.of_tensors(numels, 8)
    planned = ParamPartition.of_shape(Shape.of(QWEN_SMALL, 1024), 8)
    assert (planned.params, planned.largest_leaf_params) == (traced.params, traced.largest_leaf_params)
    assert planned.persistent_params == traced.persistent_params == (2 * 4 + 1) * 896 + 4 * (896 + 2 * 128)
    assert 0 <= traced.stage3_optimizer_params - planned.stage3_optimizer_params <= len(numels)
    assert 0 <= traced.flat_optimizer_params - planned.flat_optimizer_params <= 1


@pytest.mark.parametrize(
    "layout, seq_len, precision",
    [
        (Layout(num_gpus=1, zero_stage=0, recompute="full", loss="full"), 1024, "bf16"),
        (Layout(num_gpus=8, zero_stage=3, sp_degree=2, recompute="none", loss="full", micro_batch_size=2), 2048, "bf16"),
        (Layout(num_gpus=2, zero_stage=0, recompute="none", loss="chunked"), 1024, "fp32"),
    ],
    ids=["zero0-recompute-full", "zero3-sp2-no-recompute-mb2", "fp32-zero0-2gpus-chunked"],
)
def test_analytic_within_goal_of_trace(layout, seq_len, precision):
    res = trace_memory(QWEN_SMALL, seq_len, layout, precision=precision)
    analytic = estimate_memory(QWEN_SMALL, load_gpu("a100-80g"), layout, seq_len, precision=precision)
    a_total, t_total = comparable_totals(res, analytic.terms)
    assert abs(a_total - t_total) / t_total <= 0.03, (a_total, t_total, res.terms, analytic.terms)
    assert res.tokens_per_rank == seq_len // layout.sp_degree


@pytest.mark.parametrize(
    "layout, seq_len, precision",
    [
        (Layout(num_gpus=8, zero_stage=3, recompute="full", loss="chunked"), 2048, "bf16"),
        (Layout(num_gpus=8, zero_stage=3, recompute="none", loss="full", attention="eager"), 1024, "bf16"),
        # fp32: the peak moves to the tied embedding's backward (three V x h fp32 gradients)
        (Layout(num_gpus=8, zero_stage=3, recompute="full", loss="chunked"), 2048, "fp32"),
        (Layout(num_gpus=8, zero_stage=3, recompute="none", loss="full", attention="eager"), 1024, "fp32"),
    ],
    ids=["chunked-recompute", "eager-no-recompute", "fp32-chunked-recompute", "fp32-eager-no-recompute"],
)
def test_activation_and_loss_terms_within_goal_of_trace(layout, seq_len, precision):
    """Model states are partition arithmetic on both sides; the activation, logits and loss
    terms are the independently traced part, so each is checked on its own at the peak."""
    from ltune.planner.memory import phase_terms

    res = trace_memory(QWEN_SMALL, seq_len, layout, precision=precision, loss_chunk_tokens=512)
    analytic = phase_terms(Shape.of(QWEN_SMALL, seq_len, precision, loss_chunk_tokens=512), layout,
                           load_gpu("a100-80g"), res.peak_phase)
    traced = res.phase_terms[res.peak_phase]
    for term in ("activations_checkpoints", "activations_layer", "logits_loss"):
        a, t = analytic[term], traced.get(term, 0)
        assert abs(a - t) <= 0.03 * max(t, 2**20), (res.peak_phase, term, a, t)


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match="sp_degree"):
        trace_memory(TINY, 256, Layout(num_gpus=3, sp_degree=3))
    with pytest.raises(ValueError, match="must divide seq_len"):
        trace_memory(TINY, 255, Layout(num_gpus=2, sp_degree=2))


def test_cli_trace_json_and_errors(tmp_path):
    import json

    from typer.testing import CliRunner

    from ltune.cli import app

    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 352, "vocab_size": 512,
    }))
    pins = ["--gpus", "2", "--zero-stage", "2", "--sp-degree", "1", "--micro-batch", "1", "--offload", "none",
            "--recompute", "full", "--loss", "chunked", "--loss-chunk-tokens", "64"]
    result = CliRunner().invoke(app, ["trace", "--model", str(config), "--ctx", "256", *pins, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["layout"]["zero_stage"] == 2 and out["layout"]["loss"] == "chunked"
    traced = out["traced"]
    assert traced["terms"]["weights"] == 2 * traced["num_params"]  # ZeRO-2 keeps whole 16-bit weights
    assert out["comparable"]["traced_bytes"] == sum(traced["terms"].values())
    terms = {row["term"] for row in out["comparison"]}
    assert {"weights", "logits_loss", "fragmentation"} <= terms
    bad = CliRunner().invoke(app, ["trace", "--model", str(config), "--ctx", "256", "--sp-degree", "3"])
    assert bad.exit_code == 2
    assert "sp_degree (3) must divide" in bad.output
    missing = CliRunner().invoke(app, ["trace", "--ctx", "256"])
    assert missing.exit_code == 2


# ---------------------------------------------------------------- the newer families (qwen3, gemma2/3, phi3)
# One tiny model per family, built by the trainer from ModelProfile.to_hf_config (Qwen3ForCausalLM,
# Gemma2ForCausalLM, Gemma3ForCausalLM, Phi3ForCausalLM); each family's own terms (q/k norms, four
# fp32 norms and their backward, GeGLU, logit soft-capping, fused qkv / gate_up, gemma3's local
# RoPE) against the traced step, term by term at the traced peak.

def _family(name, **kw):
    from ltune.profiles.schema import ModelProfile

    base = dict(name=name, source="test", hidden_size=256, num_layers=4, num_attention_heads=4, num_kv_heads=2,
                intermediate_size=704, vocab_size=1024)
    return ModelProfile(**{**base, "family": name, **kw})


GEMMA = dict(head_dim=128, tie_word_embeddings=True, mlp_activation="gelu_tanh", norms_per_layer=4,
             embedding_multiplier=256**0.5, query_pre_attn_scalar=128)
FAMILIES = {
    "qwen3": _family("qwen3", qk_norm=True, head_dim=128, tie_word_embeddings=True),
    "gemma2": _family("gemma2", **GEMMA, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                      sliding_window=4096, sliding_window_pattern=2),
    # 7 layers, pattern 6: local and global layers, each kind with its own RoPE
    "gemma3": _family("gemma3", **{**GEMMA, "num_layers": 7}, qk_norm=True, sliding_window=512,
                      sliding_window_pattern=6),
    "phi3": _family("phi3", num_kv_heads=4, fused_qkv=True, fused_gate_up=True),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("recompute, loss", [("full", "full"), ("none", "full")])
def test_family_terms_match_the_trace(family, recompute, loss):
    from ltune.planner.memory import phase_terms

    model, seq_len = FAMILIES[family], 1024
    layout = Layout(num_gpus=1, zero_stage=0, recompute=recompute, loss=loss)
    res = trace_memory(model, seq_len, layout, loss_chunk_tokens=256)
    shape = Shape.of(model, seq_len, loss_chunk_tokens=256)
    for phase in ("loss", "backward"):
        analytic, traced = phase_terms(shape, layout, load_gpu("a100-80g"), phase), res.phase_terms[phase]
        # the peak phase's terms; at the other phase, what bounds the peak there
        terms = ("activations_checkpoints", "activations_layer", "logits_loss") if phase == res.peak_phase else (
            ("activations_layer",) if phase == "backward" and recompute == "full" else ())
        for term in terms:
            a, t = analytic[term], traced.get(term, 0)
            assert abs(a - t) <= 0.01 * max(t, 2**20), (family, phase, term, a, t)
