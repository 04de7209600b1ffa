"""The trainer builds and trains the newer families (qwen3, gemma2, gemma3, phi3, llama with
rope_scaling, mistral with head_dim): each profile builds its own transformers class with the
parameters the profile counts; the trainer's attention honours per-layer sliding windows, attention
soft-capping and the query_pre_attn_scalar scale (against a naive per-query reference, and against
transformers' own eager gemma2); the loss soft-caps the logits as Gemma2ForCausalLM does (against
its own forward loss and gradients); a tiny gemma2 trains. CPU, fp32, tiny sizes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ltune.planner.io import load_plan
from ltune.profiles.schema import ModelProfile
from ltune.trainer import attention
from ltune.trainer.attention import varlen_attention
from ltune.trainer.loss import shift_labels

ROOT = Path(__file__).resolve().parent.parent
BASE = dict(source="test", hidden_size=64, num_layers=4, num_attention_heads=4, num_kv_heads=2,
            intermediate_size=96, vocab_size=128)
GEMMA = dict(head_dim=32, norms_per_layer=4, mlp_activation="gelu_tanh", embedding_multiplier=8.0,
             tie_word_embeddings=True)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
FAMILIES = {
    "qwen3": dict(family="qwen3", qk_norm=True, head_dim=32, tie_word_embeddings=True),
    "gemma2": dict(family="gemma2", **GEMMA, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   query_pre_attn_scalar=24, sliding_window=8, sliding_window_pattern=2),
    "gemma3": dict(family="gemma3", **GEMMA, qk_norm=True, query_pre_attn_scalar=32, sliding_window=8,
                   sliding_window_pattern=3, rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "phi3": dict(family="phi3", fused_qkv=True, fused_gate_up=True),
    "llama": dict(family="llama", rope_theta=5e5, rope_scaling=LLAMA3_SCALING, max_position_embeddings=131072,
                  tie_word_embeddings=True),
    "mistral": dict(family="mistral", head_dim=24),
}
CLASSES = {"qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
           "phi3": "Phi3ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def _profile(family: str, **overrides) -> ModelProfile:
    return ModelProfile(name=f"tiny-{family}", **{**BASE, **FAMILIES[family], **overrides})


def _build(profile: ModelProfile, attn_impl: str = "eager", seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(profile.to_hf_config())
    fields.pop("architectures")
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config._attn_implementation = attn_impl
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(config)
    lm.config._attn_implementation = attn_impl
    return lm.float().eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_builds_its_transformers_class(family):
    profile = _profile(family)
    assert profile.to_hf_config()["architectures"] == [CLASSES[family]]
    lm = _build(profile)
    assert type(lm).__name__ == CLASSES[family]
    # the module tree transformers builds holds the parameters the profile counts
    assert sum(p.numel() for p in lm.parameters()) == profile.num_params()
    attn = [layer.self_attn for layer in lm.model.layers]
    if family in ("gemma2", "gemma3"):
        # per-layer windows in transformers' own pattern, and the scale 1/sqrt(query_pre_attn_scalar)
        assert [a.sliding_window for a in attn] == [8 if profile.is_local_layer(i) else None for i in range(4)]
        assert attn[0].scaling == pytest.approx(profile.query_pre_attn_scalar**-0.5)
        assert lm.model.embed_tokens.embed_scale.item() == pytest.approx(8.0)  # sqrt(hidden_size)
    if family == "gemma2":
        assert [a.attn_logit_softcapping for a in attn] == [50.0] * 4
        assert lm.config.final_logit_softcapping == 30.0
        assert lm.config.hidden_activation == "gelu_pytorch_tanh"
    if family in ("qwen3", "gemma3"):
        assert attn[0].q_norm.weight.shape == (profile.head_size,)
    if family == "phi3":
        assert attn[0].qkv_proj.out_features == profile.q_size + 2 * profile.kv_size
    if family == "mistral":
        assert attn[0].q_proj.out_features == 4 * 24 and attn[0].scaling == pytest.approx(24**-0.5)
    if family == "llama":
        assert lm.config.rope_parameters["rope_type"] == "llama3"


@pytest.mark.parametrize(
    "family, overrides, feature",
    [
        ("qwen3", dict(qk_norm=False), "qk_norm"),
        ("llama", dict(qk_norm=True), "qk_norm"),
        ("llama", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
        ("gemma3", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),  # Gemma3Attention never caps
        ("mistral", dict(final_logit_softcapping=30.0), "final_logit_softcapping"),
        ("gemma2", dict(mlp_activation="silu"), "mlp_activation"),
        ("gemma2", dict(embedding_multiplier=1.0), "embedding_multiplier"),
        ("phi3", dict(fused_gate_up=False), "fused_gate_up"),
        ("qwen3", dict(fused_qkv=True), "fused_qkv"),
        ("mistral", dict(sliding_window=16, sliding_window_pattern=2), "sliding_window"),
    ],
)
def test_a_feature_the_family_cannot_build_is_refused_by_name(family, overrides, feature):
    with pytest.raises(ValueError, match=feature):
        _profile(family, **overrides).to_hf_config()


# ---------------------------------------------------------------- attention


def _naive_attention(q, k, v, cu_seqlens, scale, sliding_window, softcap):
    """Per query, by definition: keys of its document at or before it and fewer than
    sliding_window positions back; scores scale * q.k, capped softcap * tanh(s / softcap)."""
    n_rep = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        for i in range(start, end):
            lo = start if sliding_window is None else max(start, i - sliding_window + 1)
            for h in range(q.shape[1]):
                keys, values = k[lo:i + 1, h // n_rep], v[lo:i + 1, h // n_rep]
                scores = (keys @ q[i, h]) * scale
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                out[i, h] = torch.softmax(scores, dim=0) @ values
    return out


@pytest.mark.parametrize("sliding_window, softcap", [(None, None), (4, None), (1, None), (None, 2.0), (4, 2.0)])
def test_varlen_attention_equals_a_naive_reference(sliding_window, softcap):
    attention.set_attention_backend("sdpa")  # what a CPU runs
    try:
        gen = torch.Generator().manual_seed(0)
        cu = torch.tensor([0, 9, 12, 23], dtype=torch.int32)  # documents of 9, 3 and 11 tokens
        q = (3 * torch.randn(23, 4, 8, generator=gen)).requires_grad_(True)  # big scores: the cap bites
        k = (3 * torch.randn(23, 2, 8, generator=gen)).requires_grad_(True)  # GQA: 2 kv heads
        v = torch.randn(23, 2, 8, generator=gen).requires_grad_(True)
        scale = 24**-0.5  # a scale other than head_dim**-0.5, as gemma's query_pre_attn_scalar gives
        got = varlen_attention(q, k, v, cu, 11, causal=True, scale=scale, sliding_window=sliding_window,
                               softcap=softcap)
        expected = _naive_attention(q, k, v, cu, scale, sliding_window, softcap)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(got.square().sum(), (q, k, v))
        expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    finally:
        attention.set_attention_backend(None)


def test_flash_window_convention_is_transformers_sliding_window():
    """transformers' sliding_window_overlay lets query i see key j when j > i - w: w keys, i's own
    included, which flash-attn's window_size (left, right) writes as (w - 1, 0)."""
    assert attention._flash_window(True, 4) == (3, 0)
    assert attention._flash_window(True, None) == (-1, 0)
    allowed = attention.allowed_keys(6, True, 4, "cpu")
    assert allowed.sum(dim=1).tolist() == [1, 2, 3, 4, 4, 4]


def _gemma2(**overrides) -> ModelProfile:
    # caps small enough to bite on random weights; a window shorter than the documents
    return _profile("gemma2", **{"attn_logit_softcapping": 0.5, "final_logit_softcapping": 2.0,
                                 "sliding_window": 5, **overrides})


def test_gemma2_body_with_trainer_attention_equals_transformers_eager_on_packed_documents():
    """Two documents packed in one row through the trainer's attention give, token for token,
    the hidden states transformers' eager gemma2 (its own window, cap and scale) gives for each
    document alone."""
    lm = _build(_gemma2(), attn_impl=attention.register_with_transformers())
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 128, (1, n), generator=gen) for n in (7, 12)]
    packed_ids = torch.cat(docs, dim=1)
    packed_pos = torch.cat([torch.arange(7), torch.arange(12)]).unsqueeze(0)
    cu = torch.tensor([0, 7, 19], dtype=torch.int32)
    with torch.no_grad():
        packed = lm.model(input_ids=packed_ids, position_ids=packed_pos, use_cache=False, cu_seq_lens_q=cu,
                          cu_seq_lens_k=cu, max_length_q=12, max_length_k=12).last_hidden_state
        lm.config._attn_implementation = "eager"
        alone = [lm.model(input_ids=d, use_cache=False).last_hidden_state for d in docs]
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- loss


def _tiny_plan(profile: ModelProfile, loss: str, chunk_tokens: int = 5, attention_kind: str = "varlen"):
    plan = load_plan(ROOT / "examples" / "tiny-cpu-qwen3" / "plan.yaml")
    return plan.model_copy(update={
        "model": plan.model.model_copy(update={"architecture": profile}),
        "layout": plan.layout.model_copy(update={"loss": loss, "recompute": "none", "zero_stage": 0,
                                                 "attention": attention_kind}),
        "training": plan.training.model_copy(update={"loss_chunk_tokens": chunk_tokens}),
    })


@pytest.mark.parametrize("loss", ["full", "chunked"])
def test_trainer_loss_with_logit_softcap_equals_gemma2_forward_loss(loss):
    """build_model's TrainModel (body + LossHead with the config's final_logit_softcapping) gives
    Gemma2ForCausalLM's own forward loss (logits capped, then cross entropy), and its gradients."""
    from ltune.trainer.model import build_model

    model = build_model(_tiny_plan(_gemma2(), loss, attention_kind="eager"))
    lm = model.lm
    assert lm.lm_head.softcap == 2.0
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(16).unsqueeze(0)

    loss_sum, num_tokens = model(ids, pos, shift_labels(ids, pos))
    ours = loss_sum / num_tokens
    ours_grads = torch.autograd.grad(ours, [lm.model.embed_tokens.weight, lm.model.layers[0].mlp.up_proj.weight])
    head_class = lm.lm_head.__class__
    lm.lm_head.__class__ = torch.nn.Linear  # transformers' own head, softcap and loss
    try:
        theirs = lm(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss
    finally:
        lm.lm_head.__class__ = head_class
    theirs_grads = torch.autograd.grad(theirs, [lm.model.embed_tokens.weight, lm.model.layers[0].mlp.up_proj.weight])
    assert num_tokens.item() == 15
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_tiny_gemma2_trains():
    """A few AdamW steps on one packed batch (trainer attention, chunked soft-capped loss): the
    loss falls and stays finite."""
    from ltune.trainer.model import build_model

    model = build_model(_tiny_plan(_gemma2(attn_logit_softcapping=50.0, final_logit_softcapping=30.0), "chunked"))
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (1, 24), generator=gen)
    pos = torch.cat([torch.arange(10), torch.arange(14)]).unsqueeze(0)
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    targets = shift_labels(ids, pos)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss_sum, n = model(ids, pos, targets, cu, 14)
        loss = loss_sum / n
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------- rope scaling


def test_plan_rope_scaling_reaches_the_built_model(tmp_path):
    """The architecture's rope_scaling is in the built model's config, and its RoPE frequencies are
    the scaled ones (llama3: the low frequencies divided by the factor); a model folder's config
    takes the plan's block too."""
    from ltune.trainer.model import build_model, hf_config

    base = dict(family="llama", rope_theta=5e5, max_position_embeddings=131072, tie_word_embeddings=True)
    scaled = ModelProfile(name="scaled", **{**BASE, **base, "rope_scaling": LLAMA3_SCALING})
    plain = ModelProfile(name="plain", **{**BASE, **base})
    model = build_model(_tiny_plan(scaled, "full"))
    params = model.lm.config.rope_parameters
    assert params["rope_type"] == "llama3" and params["factor"] == 32.0 and params["rope_theta"] == 5e5
    inv_freq = model.lm.model.rotary_emb.inv_freq
    plain_inv_freq = build_model(_tiny_plan(plain, "full")).lm.model.rotary_emb.inv_freq
    # llama3: wavelengths beyond original_max_position_embeddings / low_freq_factor are divided by the factor
    torch.testing.assert_close(inv_freq[-1], plain_inv_freq[-1] / 32.0)
    torch.testing.assert_close(inv_freq[0], plain_inv_freq[0])

    # a model folder: its config.json has no scaling; the plan's block is applied to it
    _build(plain).config.save_pretrained(tmp_path)
    plan = _tiny_plan(scaled, "full")
    plan = plan.model_copy(update={"model": plan.model.model_copy(update={"path": str(tmp_path)})})
    config = hf_config(plan, "eager")
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 5e5
