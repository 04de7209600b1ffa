"""Activation, logits and loss terms of the per-GPU memory, one function per term.

Counted tensor by tensor from the Llama decoder layer as transformers implements it
(modeling_llama.py), in the style of Korthikanti et al. 2022 (arXiv 2205.05198), and
checked against `ltune trace` (bench/accuracy.py).
"""

from __future__ import annotations

from .schema import Layout
from .shape import FP32, Shape, tokens_per_rank, upcast_copy_bytes

# Korthikanti et al. count 34*s*b*h for a GPT layer; the gated MLP and GQA change the sum.


def rmsnorm_saved_bytes_per_token(s: Shape, feeds_linear: bool = True) -> int:
    """One hidden-size RMSNorm. Llama's (modeling_llama.py `LlamaRMSNorm.forward`) upcasts
    to fp32 and saves it (4h; in fp32 that is its input itself) and the normalised x cast
    back to the model dtype (dh). Gemma's (modeling_gemma2.py `Gemma2RMSNorm.forward`,
    modeling_gemma3.py `Gemma3RMSNorm.forward`) multiplies by (1 + weight) in fp32 before
    the cast: it saves the fp32 input (4h) and the fp32 normalised x (4h). When a linear
    layer follows, it saves the norm's output (dh); gemma's post-attention and
    post-feedforward norms feed the residual add, which saves nothing. d is the model
    dtype's bytes (llama-style, 16-bit, followed by a linear: 8h in all)."""
    d = s.dtype_bytes
    saved = 2 * FP32 if s.gemma_norms else FP32 + d
    return (saved + (d if feeds_linear else 0)) * s.hidden_size


def layer_norms_saved_bytes_per_token(s: Shape) -> int:
    """A layer's norms: input and post-attention (llama: both feed linear layers); gemma2/3
    add pre- and post-feedforward norms (modeling_gemma2.py `Gemma2DecoderLayer.forward`):
    input and pre-feedforward feed q/k/v and gate/up, post-attention and post-feedforward
    feed the residual add."""
    if s.norms_per_layer == 4:
        return 2 * rmsnorm_saved_bytes_per_token(s) + 2 * rmsnorm_saved_bytes_per_token(s, feeds_linear=False)
    return 2 * rmsnorm_saved_bytes_per_token(s)


def qk_norm_saved_bytes_per_token(s: Shape) -> int:
    """RMSNorm over each head of q and k (modeling_qwen3.py `Qwen3Attention.forward`, q_norm and
    k_norm of Qwen3RMSNorm; modeling_gemma3.py `Gemma3Attention.forward`, Gemma3RMSNorm): per
    element of q and k the norm's saved tensors (Qwen3, llama-style: fp32 input and normalised
    x in the model dtype, 4 + d; Gemma3: fp32 input and fp32 normalised x, 8) and one fp32
    rsqrt per head; the norm's output goes to RoPE, which saves only cos and sin."""
    if not s.qk_norm:
        return 0
    per_elem = 2 * FP32 if s.gemma_norms else FP32 + s.dtype_bytes
    return per_elem * (s.q_size + s.kv_size) + FP32 * (s.num_attention_heads + s.kv_heads)


def attention_saved_bytes_per_token(s: Shape, lay: Layout) -> int:
    """Varlen flash attention saves q, k, v (after RoPE), its output and an fp32
    logsumexp per head (Dao 2023, FlashAttention-2); RoPE saves only cos/sin. Eager
    attention (transformers' eager_attention_forward) saves q, k and v repeated to all
    query heads (repeat_kv) and the attention output, in the model dtype (its scores: see
    eager_attention_bytes_per_layer)."""
    d = s.dtype_bytes
    # Phi3 (modeling_phi3.py `Phi3Attention.forward`): q, k, v are slices of one qkv_proj
    # output; q and k are copied by RoPE, but v stays a view, and whoever saves v keeps the
    # whole q + 2kv storage: flash-attn (its varlen glue reshapes v without a copy) and eager
    # when repeat_kv returns v itself (as many kv heads as query heads).
    fused_v = d * (s.q_size + s.kv_size) if s.fused_qkv else 0
    if lay.attention == "eager":
        return d * 4 * s.q_size + (fused_v if s.kv_heads == s.num_attention_heads else 0)
    if s.sdpa_math:  # only the concatenated output, which o_proj saves: the rest is sdpa_math_bytes_per_layer
        return d * s.q_size
    # Phi3's apply_rotary_pos_emb (modeling_phi3.py) ends in torch.cat, whose q is laid out
    # head-major; flash's output (empty_like(q), flash_api.cpp mha_varlen_fwd) is too, and
    # Phi3Attention.forward's `.contiguous()` before o_proj copies it (dq, saved by o_proj).
    out_copy = d * s.q_size if s.head_major_rope else 0
    return d * (2 * s.q_size + 2 * s.kv_size) + FP32 * s.num_attention_heads + fused_v + out_copy


def sdpa_math_attention_bytes(*, heads: int, num_tokens: int, doc_tokens: int, head_dim: int) -> dict[str, int]:
    """SDPA's math backend per document (torch attention.cpp `_scaled_dot_product_attention_math`).

    Pre-Ampere, ltune/trainer/attention.py `_sdpa_per_document` calls scaled_dot_product_attention
    on 3-D (heads, len, head_dim) tensors, kv heads repeated to all query heads; every fused
    kernel needs 4-D inputs (ATen sdp_utils_cpp.h `check_tensor_shapes`), so the math backend
    runs, and it upcasts 16-bit inputs to fp32 (torch.backends.cuda
    .fp16_bf16_reduction_math_sdp_allowed() is False by default). For num_tokens tokens in
    documents of doc_tokens L, per head:
    - saved_bytes: the fp32 scaled q, scaled k and v (3 x 4 x D per token) and the fp32 softmax
      probabilities (4 x L per token: L x L per document), kept until backward;
    - backward_temp_bytes: one document's softmax backward, the fp32 gradient of the
      probabilities and the fp32 gradient of the scores (2 x 4 x L x L), beside the saved ones.
    """
    return {
        "saved_bytes": heads * num_tokens * FP32 * (3 * head_dim + doc_tokens),
        "backward_temp_bytes": heads * 2 * FP32 * doc_tokens * doc_tokens,
    }


def sdpa_math_bytes_per_layer(s: Shape, lay: Layout) -> dict[str, int]:
    """`sdpa_math_attention_bytes` of one layer on this rank (Ulysses: all of the micro-batch's
    tokens, its share of the heads); zero unless varlen attention runs SDPA (pre-Ampere GPUs)."""
    if lay.attention != "varlen" or not s.sdpa_math:
        return {"saved_bytes": 0, "backward_temp_bytes": 0}
    return sdpa_math_attention_bytes(
        heads=s.num_attention_heads // lay.sp_degree, num_tokens=lay.micro_batch_size * s.seq_len,
        doc_tokens=s.attention_tokens, head_dim=s.q_size // s.num_attention_heads,
    )


def mlp_saved_bytes_per_token(s: Shape) -> int:
    """SwiGLU saves gate, silu(gate), up and their product: 4 x ffn values of the model dtype.
    GeGLU (gemma: ACT2FN["gelu_pytorch_tanh"], activations.py `GELUTanh`, F.gelu with
    approximate="tanh") saves the same: gelu's backward needs its input only, as silu's.
    Phi3's fused gate_up (modeling_phi3.py `Phi3MLP.forward`): gate and up are chunks (views)
    of one 2 x ffn output, saved by the activation and the product: the same 2 x ffn."""
    return 4 * s.dtype_bytes * s.intermediate_size


def layer_saved_bytes_per_token(s: Shape, lay: Layout, moe: bool = False) -> int:
    """Everything one decoder layer saves for backward, per token (no recompute); `moe`: a layer
    whose MLP is the sparse MoE block (`moe_mlp_saved_bytes_per_token`) instead of the dense one;
    multi-head latent attention in place of the usual attention where the model has it."""
    attention = mla_saved_bytes_per_token(s, lay) if s.is_mla else attention_saved_bytes_per_token(s, lay)
    return (
        layer_norms_saved_bytes_per_token(s)
        + qk_norm_saved_bytes_per_token(s)
        + attention
        + (moe_mlp_saved_bytes_per_token(s) if moe else mlp_saved_bytes_per_token(s))
    )


# ---------------------------------------------------------------- mixture of experts, MLA
# transformers 5.24 with config._experts_implementation "grouped_mm" (ltune/trainer/model.py pins it):
# transformers/integrations/moe.py `grouped_mm_experts_forward`. Its tensors are sized by
# S = tokens x top_k only, never by how the router spreads them (the trace runs on fake tensors,
# which carry no routing at all: see ltune/trace/tracer.py). Per-layer constants (the E int32
# offsets, 512 B on CUDA) are left out.

INT64 = 8


def router_fp32(s: Shape) -> bool:
    """DeepSeek's routers compute their logits in fp32 (`DeepseekV2TopkRouter.forward`,
    `DeepseekV3TopkRouter.forward`: `F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))`)."""
    return s.family in ("deepseek_v2", "deepseek_v3")


def router_renormalises(s: Shape) -> bool:
    """The top-k weights are divided by their sum: always in `MixtralTopKRouter`; with
    norm_topk_prob in qwen2_moe, qwen3_moe and deepseek_v3 (`DeepseekV3MoE.route_tokens_to_experts`);
    never in deepseek_v2 (`DeepseekV2TopkRouter`: greedy top-k times routed_scaling_factor)."""
    family = s.family
    if family == "mixtral":
        return True
    return family != "deepseek_v2" and s.norm_topk_prob


def routing_weight_bytes(s: Shape) -> int:
    """Bytes of one top-k routing weight as the experts receive it: the model dtype where the router
    casts them back (modeling_qwen2_moe.py / modeling_qwen3_moe.py `Qwen*MoeTopKRouter.forward`:
    `router_top_value.to(router_logits.dtype)`), fp32 otherwise (modeling_mixtral.py
    `MixtralTopKRouter`, modeling_deepseek_v2.py `DeepseekV2TopkRouter`, modeling_deepseek_v3.py:
    fp32 softmax/sigmoid scores, never cast)."""
    return s.dtype_bytes if s.family in ("qwen2_moe", "qwen3_moe") else FP32


def router_saved_bytes_per_token(s: Shape) -> int:
    """The router of one MoE layer, per token, saved for backward: the fp32 scores (softmax or
    sigmoid output, E x 4), the top-k indices (int64, k x 8, kept by topk's backward) and, where the
    top-k weights are renormalised (mixtral always, `MixtralTopKRouter`; qwen with norm_topk_prob;
    deepseek_v3 `DeepseekV3MoE.route_tokens_to_experts`), the fp32 sum (4) and the weights before
    the in-place division (autograd's clone of `router_top_value`, k x 4). DeepSeek's routers
    (`DeepseekV2TopkRouter.forward`: `F.linear(hidden_states.type(torch.float32), ...)`) run the
    gate in fp32: the fp32 copy of the hidden states (4h, for the weight gradient) is kept too
    (`router_constant_bytes`: the fp32 copy of the gate weight). The logits themselves (model dtype,
    or fp32 for deepseek) are not saved: the softmax keeps its output."""
    k = s.num_experts_per_tok
    saved = FP32 * s.num_experts + INT64 * k
    if router_renormalises(s):
        saved += FP32 + FP32 * k
    if router_fp32(s) and s.dtype_bytes != FP32:
        saved += FP32 * s.hidden_size
    return saved


def router_constant_bytes(s: Shape) -> int:
    """Per MoE layer, whatever the tokens: DeepSeek's gate weight copied to fp32 for its fp32
    matmul (`DeepseekV2TopkRouter.forward`: `self.weight.type(torch.float32)`, saved by the mm)."""
    return FP32 * s.num_experts * s.hidden_size if router_fp32(s) and s.dtype_bytes != FP32 else 0


def dispatch_saved_bytes_per_token(s: Shape) -> int:
    """The routed experts of one MoE layer (integrations/moe.py `grouped_mm_experts_forward`), per
    token: for each of its k (token, expert) rows, sorted by expert, the permutation (int64, kept by
    the gather of the weights) and perm // k (int64, kept by the gather of the hidden states), the
    gathered hidden states (d x h, input of the up grouped_mm), the gathered routing weight
    (`routing_weight_bytes`), the grouped up projection's output (d x 2F: gate and up, views of it,
    kept by the activation and the product), act(gate) and act(gate) * up (d x F each, the latter the
    down grouped_mm's input), the down output (d x h, kept by the weighting product) and the inverse
    permutation (int64, kept by the un-permuting gather): k x (24 + w + 2dh + 4dF). The weighted
    output, its un-permuted copy and the sum over top-k are not saved."""
    d, h, f = s.dtype_bytes, s.hidden_size, s.moe_intermediate_size
    per_row = 3 * INT64 + routing_weight_bytes(s) + 2 * d * h + 4 * d * f
    return s.num_experts_per_tok * per_row


def shared_expert_saved_bytes_per_token(s: Shape) -> int:
    """The shared experts, a gated MLP every token passes (modeling_deepseek_v2.py
    `DeepseekV2Moe.shared_experts`, n_shared_experts x moe width; modeling_qwen2_moe.py
    `Qwen2MoeSparseMoeBlock.shared_expert`): as `mlp_saved_bytes_per_token`, 4d per unit of width;
    qwen2_moe's `shared_expert_gate` then multiplies its output by sigmoid(gate(x)), which keeps
    both: the expert's output (d x h) and the sigmoid's (d)."""
    d = s.dtype_bytes
    saved = 4 * d * s.shared_expert_intermediate_size
    if s.shared_expert_gate:
        saved += d * s.hidden_size + d
    return saved


def moe_mlp_saved_bytes_per_token(s: Shape) -> int:
    """The sparse MoE block of one layer in place of the dense MLP: router, routed experts and
    shared experts, per token."""
    return router_saved_bytes_per_token(s) + dispatch_saved_bytes_per_token(s) + shared_expert_saved_bytes_per_token(s)


def small_rmsnorm_saved_bytes_per_token(s: Shape, width: int) -> int:
    """An RMSNorm over `width` features feeding a linear layer (MLA's q_a_layernorm, kv_a_layernorm:
    DeepseekV2RMSNorm, llama-style): fp32 input, model-dtype normalised x, its weighted output, and
    the fp32 rsqrt of each token (4)."""
    return (FP32 + 2 * s.dtype_bytes) * width + FP32


def mla_saved_bytes_per_token(s: Shape, lay: Layout) -> int:
    """Multi-head latent attention (modeling_deepseek_v2.py / modeling_deepseek_v3.py
    `DeepseekV2Attention.forward`) under flash-attn, per token. H heads of q/k head size D
    (nope + rope) and value head size Dv: q_a_layernorm (with q_lora_rank) and kv_a_layernorm on the
    compressed latents (`small_rmsnorm_saved_bytes_per_token`); the query (`torch.cat` of nope and
    rope parts, a new H x D tensor), the key (`expand_kv`'s new_empty, H x D), the value padded to D
    (integrations/flash_attention.py `F.pad`: flash-attn takes one head size), flash's output
    (H x D) and fp32 logsumexp (4H); the output cropped to Dv and copied by the reshape before
    o_proj (H x Dv, o_proj's input). kv_b_proj's output, q_pe/k_pe and their RoPE are not saved.
    Eager attention: `attention_saved_bytes_per_token` (not traced for MLA)."""
    if lay.attention == "eager" or s.sdpa_math:
        return attention_saved_bytes_per_token(s, lay)
    d, heads = s.dtype_bytes, s.num_attention_heads
    q = s.q_size
    norms = small_rmsnorm_saved_bytes_per_token(s, s.kv_lora_rank)
    if s.q_lora_rank:
        norms += small_rmsnorm_saved_bytes_per_token(s, s.q_lora_rank)
    return norms + d * 4 * q + FP32 * heads + d * heads * s.value_head_size


def moe_backward_transient_bytes_per_token(s: Shape, recompute: bool = False) -> int:
    """Gradients in flight at a MoE layer's backward peak (integrations/moe.py
    `grouped_mm_experts_forward` run backwards; `ltune trace` inventory), beside the incoming hidden
    gradient (d x h), the larger of:
    - the weighting product's backward: the un-permuted gradient (index_put into S x h zeros), the
      gradients of the down output and of the weights before their sum (S x h each), in the
      product's dtype (fp32 with fp32 routing weights: mixtral, deepseek, whose output cast back,
      `.to(hidden_states.dtype)`, also upcasts the incoming gradient, 4h): 3k x w x h;
    - the gated activation's backward: the gradient of act(gate) * up (from the down grouped_mm)
      and those of act(gate) and up (S x F each), and the routing weights' summed gradient (k x w);
    - the shared experts' MLP backward (as `layer_backward_transient_bytes_per_token`, 2 x width).
    qwen2_moe's gated shared expert: its gradient through the sigmoid product (d x h) is made first
    (the product runs last in the forward) and waits through the routed experts' backward. With full
    recompute and fp32 weights, non-reentrant checkpointing hands the recomputed down output to the
    product's backward and drops it there (torch.utils.checkpoint unpack), before the fp32 sum: k x dh
    less at that moment (`ltune trace`; within k x 14 bytes per token of it)."""
    d, h, f, k = s.dtype_bytes, s.hidden_size, s.moe_intermediate_size, s.num_experts_per_tok
    w = routing_weight_bytes(s)
    # net of what the layer's backward has released by then: the inverse permutation (after the
    # un-permuting gather's backward); at the activation's backward also the down output, the
    # routing weights (after the product's backward) and act(gate) * up (after the down grouped_mm's)
    weighting = 3 * k * w * h + (FP32 * h if w == FP32 and d != FP32 else 0) - INT64 * k
    if recompute and w == FP32 and d != FP32 and not s.shared_expert_intermediate_size:
        weighting -= k * d * h  # measured without shared experts only (deepseek: see bench/accuracy.py)
    activation = 3 * k * d * f + k * w - k * (d * h + d * f + w + INT64)
    shared = 2 * d * s.shared_expert_intermediate_size
    if s.shared_expert_gate:
        # qwen2_moe: the sigmoid product's backward ran first: the shared output's gradient and the
        # gate linear's input gradient wait (2dh); it released the product's saved tensors (dh + d)
        waiting = d * h - d
    elif s.shared_expert_intermediate_size:
        # deepseek: the shared experts ran last in the forward, so their backward runs first: it
        # released their saved tensors and the norm output only they saved (the fp32 router keeps
        # its own copy), and their input gradient (dh) waits for the routed experts'
        waiting = d * h - (4 * d * s.shared_expert_intermediate_size + (d * h if router_fp32(s) else 0))
    else:
        waiting = 0
    return d * h + max(weighting + waiting, activation + waiting, shared)


def router_logits_bytes(s: Shape, lay: Layout) -> int:
    """Every MoE layer's router logits (model dtype; fp32 for deepseek's fp32 routers) and top-k
    indices (int64), which the
    trainer's router hooks keep until the forward ends, for the load-balancing loss and the router
    statistics (ltune/trainer/model.py `TrainModel._record_router`): live while the loss runs its
    forward, not in backward."""
    if not s.is_moe:
        return 0
    logit = FP32 if router_fp32(s) else s.dtype_bytes
    # and the top-k expert indices (int64) each router chose, recorded beside its logits: without
    # recompute topk keeps them for its backward anyway (router_saved_bytes_per_token)
    indices = INT64 * s.num_experts_per_tok if lay.recompute == "full" else 0
    return s.num_moe_layers * tokens_per_rank(s, lay) * (logit * s.num_experts + indices)


def aux_loss_grad_bytes(s: Shape, lay: Layout) -> int:
    """With a load-balancing loss (router_aux_loss_coef > 0; ltune/trainer/loss.py
    `load_balancing_loss`) its backward runs first and leaves each MoE layer's router-logit
    gradient (model dtype, tokens x experts) waiting for that layer's own backward, where autograd
    sums it with the dispatch path's (measured with `ltune trace`: the backward peak grows by
    exactly this; its fp32 softmax is freed before any layer's backward)."""
    if not s.is_moe or s.router_aux_loss_coef <= 0:
        return 0
    return s.num_moe_layers * s.dtype_bytes * s.num_experts * tokens_per_rank(s, lay)


def aux_loss_probs_bytes(s: Shape, lay: Layout) -> int:
    """With a load-balancing coefficient (> 0) every MoE layer's fp32 router softmax (tokens x
    experts) is kept from the load-balancing loss' forward (ltune/trainer/loss.py
    `load_balancing_loss`) until its backward, which autograd runs after the LM loss' backward
    (measured with `ltune trace`); without one the loss runs under no_grad and keeps nothing."""
    if not s.is_moe or s.router_aux_loss_coef <= 0:
        return 0
    return s.num_moe_layers * FP32 * s.num_experts * tokens_per_rank(s, lay)


def aux_loss_forward_bytes(s: Shape, lay: Layout) -> int:
    """The load-balancing loss' forward at its peak, layer by layer (ltune/trainer/loss.py
    `load_balancing_loss`; p = one layer's fp32 tokens x experts): with a coefficient, every
    layer's kept softmax and the last layer's fp32 logit copy (L p + p); without one (no_grad), the
    previous layer's softmax still bound, the fp32 copy and the new softmax (3 p)."""
    if not s.is_moe:
        return 0
    per_layer = FP32 * s.num_experts * tokens_per_rank(s, lay)
    kept = aux_loss_probs_bytes(s, lay)
    return kept + per_layer if kept else 3 * per_layer


def moe_loss_bytes(s: Shape, lay: Layout) -> int:
    """The loss moment of a MoE model, the largest of: the load-balancing loss' backward (run
    first: every kept router softmax, the gradients of one, beside what the LM loss kept); the LM
    loss' backward-side peak (`logits_loss_bytes`) beside the router-logit gradients the former
    left waiting (`aux_loss_grad_bytes`); the load-balancing loss' forward beside the router logits
    the trainer recorded and what the LM loss kept; the chunked loss' forward (log-sum-exp and one
    chunk) beside the router logits (the full loss' forward is below its backward). The recorded
    router logits are freed when the forward returns, before any backward (`ltune trace`)."""
    routers, kept = router_logits_bytes(s, lay), loss_kept_bytes(s, lay)
    peaks = [logits_loss_bytes(s, lay) + aux_loss_grad_bytes(s, lay), routers + kept + aux_loss_forward_bytes(s, lay)]
    probs = aux_loss_probs_bytes(s, lay)
    if probs:  # its backward: the softmax gradient and its input's beside every kept softmax
        peaks.append(kept + probs + 2 * FP32 * s.num_experts * tokens_per_rank(s, lay))
    if lay.loss == "chunked":
        m = shape_chunked_loss_bytes(s, lay)
        peaks.append(routers + m["lse_bytes"] + m["forward_bytes"])
    return max(peaks)


def layer_kinds(s: Shape) -> tuple[tuple[bool, int], ...]:
    """(moe, count) of each kind of decoder layer: a dense model's layers; a MoE model's dense
    layers (deepseek's first_k_dense_replace, qwen's mlp_only_layers) and its MoE layers."""
    if not s.is_moe:
        return ((False, s.num_layers),)
    dense = s.num_layers - s.num_moe_layers
    return tuple(kind for kind in ((False, dense), (True, s.num_moe_layers)) if kind[1])


def layers_saved_bytes(s: Shape, lay: Layout) -> int:
    """All decoder layers' saved tensors (no recompute), summed per layer kind."""
    t = tokens_per_rank(s, lay)
    extra = eager_attention_bytes_per_layer(s, lay) + sdpa_math_bytes_per_layer(s, lay)["saved_bytes"]
    total = 0
    for moe, count in layer_kinds(s):
        per_layer = layer_saved_bytes_per_token(s, lay, moe) * t + extra
        if moe:
            per_layer += router_constant_bytes(s)
        total += count * per_layer
    return total


def eager_attention_bytes_per_layer(s: Shape, lay: Layout) -> int:
    """Eager attention keeps the fp32 softmax (4) and its 16-bit copy (2; none in fp32) for
    each of the heads on this rank over the whole packed sequence: quadratic in its length.
    With attention soft-capping (modeling_gemma2.py `eager_attention_forward`: scores / cap,
    tanh, * cap) tanh also saves its output (d per score). Sliding-window layers change
    nothing here: transformers' eager path computes every score and masks them."""
    per_score = FP32 + upcast_copy_bytes(s.dtype_bytes) + (s.dtype_bytes if s.attn_logit_softcapping else 0)
    return eager_scores_per_layer(s, lay) * per_score


def eager_scores_per_layer(s: Shape, lay: Layout) -> int:
    """Attention scores one layer of eager attention makes on this rank: its heads over the
    whole packed sequence, squared."""
    if lay.attention != "eager":
        return 0
    return lay.micro_batch_size * (s.num_attention_heads // lay.sp_degree) * s.seq_len * s.seq_len


def layer_backward_transient_bytes_per_token(s: Shape, recompute: bool = False) -> int:
    """Gradients in flight at a layer's backward peak, inside the gated MLP's backward
    right after down_proj's: the incoming hidden gradient (h), the gradient of
    act(gate)*up (ffn) and those of act(gate) and up (2 ffn), less act(gate)*up itself
    (ffn), which down_proj's backward has released; the outgoing hidden gradient is not
    made yet (measured with `ltune trace`, bench/accuracy.py).

    Gemma's norms (modeling_gemma2.py `Gemma2RMSNorm.forward`, all in fp32) have a backward
    of their own that can be larger: the incoming hidden gradient (dh) beside five fp32
    h-sized tensors (the upcast gradient, the gradients through the (1 + weight) product,
    the rsqrt backward's pow/div/mul temporaries), 20h + dh (`ltune trace` inventory); with
    recompute, non-reentrant checkpointing has already released the norm's own saved fp32
    input when its backward unpacked it (torch.utils.checkpoint), 16h + dh beyond the
    recomputed tensors."""
    mlp = s.dtype_bytes * (s.hidden_size + 2 * s.intermediate_size)
    if not s.gemma_norms:
        return mlp
    fp32_temps = 4 if recompute else 5
    return max(mlp, (fp32_temps * FP32 + s.dtype_bytes) * s.hidden_size)


def shared_layer_inputs_bytes(s: Shape, lay: Layout) -> int:
    """Inputs every layer reads, made once: RoPE cos and sin (model dtype, head_dim per token;
    gemma3 makes a second pair for its local layers, modeling_gemma3.py `Gemma3TextModel.forward`)
    and, for eager attention, transformers' additive mask over the whole sequence (model dtype),
    one per kind of layer (a sliding-window mask beside the causal one, same size:
    masking_utils.py `create_sliding_window_causal_mask`)."""
    t = tokens_per_rank(s, lay)
    d = s.dtype_bytes
    # MLA rotates only the qk_rope_head_dim part (modeling_deepseek_v2.py `DeepseekV2RotaryEmbedding`)
    rope_dim = s.qk_rope_head_dim if s.is_mla else s.q_size // s.num_attention_heads
    rope = 2 * d * t * rope_dim * (2 if s.local_rope else 1)
    masks = 2 if 0 < s.local_layers < s.num_layers else 1
    mask = masks * lay.micro_batch_size * s.seq_len * s.seq_len * d if lay.attention == "eager" else 0
    return rope + mask


def activation_checkpoints_bytes(s: Shape, lay: Layout) -> int:
    """Full recompute keeps each layer's input (Korthikanti et al.: 2sbh per layer in 16-bit);
    without recompute every layer keeps all it saves (`layers_saved_bytes`)."""
    if lay.recompute == "full":
        return s.num_layers * s.dtype_bytes * s.hidden_size * tokens_per_rank(s, lay)
    return layers_saved_bytes(s, lay)


def eager_backward_bytes_per_layer(s: Shape, lay: Layout) -> int:
    """Eager attention's own backward peak, at the softmax backward: the saved fp32
    softmax, the fp32 gradient of the probabilities and the fp32 softmax gradient
    (3 x 4 bytes per score; the 16-bit probabilities are released by then), beside the
    layer's input norm, q and the repeated k (2 x q), the gradient of the attention
    output (q) and the incoming hidden gradient (h), in the model dtype. Without recompute
    the saved fp32 softmax and 16-bit probabilities already count in the checkpoints."""
    if lay.attention != "eager":
        return 0
    t, d = tokens_per_rank(s, lay), s.dtype_bytes
    scores = eager_scores_per_layer(s, lay)
    if lay.recompute == "full":
        recomputed = rmsnorm_saved_bytes_per_token(s) + qk_norm_saved_bytes_per_token(s)
        return 3 * FP32 * scores + t * (recomputed + d * (s.hidden_size + 3 * s.q_size))
    return (2 * FP32 - upcast_copy_bytes(d)) * scores + d * t * (s.hidden_size + 2 * s.q_size)


def embedding_backward_bytes(s: Shape) -> int:
    """The input embedding's backward: its dense weight gradient (dVh, ATen
    embedding_dense_backward) and, with tied embeddings, autograd's out-of-place sum of it
    with the output layer's waiting gradient (another dVh; that one counts in
    tied_output_grad_bytes). Measured with `ltune trace` and a CPU profile of the sum."""
    return s.dtype_bytes * s.vocab_size * s.hidden_size * (2 if s.tie_word_embeddings else 1)


def activation_working_bytes(s: Shape, lay: Layout) -> int:
    """One layer's working set in backward, the largest over the model's layer kinds: its
    recomputed activations (with full recompute) and the gradients in flight, at the larger of
    the MLP's (dense: the gated MLP's backward; MoE: `moe_backward_transient_bytes_per_token`) and
    (eager) attention's backward peaks (eager, or SDPA's math backend per document on pre-Ampere
    GPUs)."""
    t = tokens_per_rank(s, lay)
    sdpa = sdpa_math_bytes_per_layer(s, lay)
    full = lay.recompute == "full"
    extra = eager_attention_bytes_per_layer(s, lay) + sdpa["saved_bytes"]
    best = eager_backward_bytes_per_layer(s, lay)
    for moe, _count in layer_kinds(s):
        recomputed = 0
        if full:
            recomputed = layer_saved_bytes_per_token(s, lay, moe) * t + extra + (router_constant_bytes(s) if moe else 0)
        per_token = moe_backward_transient_bytes_per_token(s, full) if moe else layer_backward_transient_bytes_per_token(s, full)
        best = max(best, per_token * t + recomputed, recomputed + sdpa["backward_temp_bytes"])
    return best


def final_norm_bytes(s: Shape, lay: Layout) -> int:
    """The final RMSNorm's saved tensors (its output feeds the output layer), live from the
    last layer to the loss backward."""
    return rmsnorm_saved_bytes_per_token(s) * tokens_per_rank(s, lay)


# ---------------------------------------------------------------- logits and loss


def logits_loss_bytes(s: Shape, lay: Layout) -> int:
    """The output layer and cross-entropy at their peak (the loss backward).

    Full: transformers' ForCausalLMLoss upcasts the 16-bit logits to fp32 and runs
    log-softmax (reference.md); its backward holds the fp32 log-probabilities, their
    gradient and the input gradient at once: 3 x 4 bytes per logit (Megatron-LM counts
    the fp32 cross-entropy at 4*s*b*V).

    Chunked: `chunked_loss_bytes` (what ltune/trainer/chunked_loss.py allocates) with the
    hidden gradient it returns (dth) beside its backward. Measured with `ltune trace` and on
    an H200 (V 128256, h 2048, 16384 tokens, chunks of 4096: full 23.48 GiB, this term 23.49;
    chunked 4.01 GiB, this term 3.98).

    With final logit soft-capping (gemma2; ltune/trainer/loss.py `causal_lm_loss`, as
    modeling_gemma2.py `Gemma2ForCausalLM.forward`: c * tanh(logits / c)) the full loss keeps
    tanh's fp32 output for its backward beside the log-probabilities: one more 4 x V per
    token. The chunked loss caps each chunk in place and adds one chunk-sized fp32 buffer in
    its backward (`chunked_loss_bytes`).
    """
    t = tokens_per_rank(s, lay)
    if lay.loss == "full":
        return (3 + s.final_logit_softcapping) * FP32 * s.vocab_size * t
    m = shape_chunked_loss_bytes(s, lay)
    return m["lse_bytes"] + max(m["forward_bytes"], m["backward_bytes"] + s.dtype_bytes * t * s.hidden_size)


def shape_chunked_loss_bytes(s: Shape, lay: Layout) -> dict[str, int]:
    """`chunked_loss_bytes` of this rank's tokens (the output layer frozen under adapters)."""
    return chunked_loss_bytes(
        chunk_tokens=s.loss_chunk_tokens,
        num_tokens=tokens_per_rank(s, lay),
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        dtype_bytes=s.dtype_bytes,
        softcap=s.final_logit_softcapping,
        weight_grad=not s.adapters,
    )


def loss_kept_bytes(s: Shape, lay: Layout) -> int:
    """What the loss keeps from its forward to its backward: the chunked loss its fp32
    log-sum-exp (tokens x 4); the full loss its fp32 log-probabilities (tokens x vocab x 4;
    ForCausalLMLoss' log-softmax)."""
    t = tokens_per_rank(s, lay)
    return FP32 * t * (1 if lay.loss == "chunked" else s.vocab_size)


def chunked_loss_bytes(
    *, chunk_tokens: int, num_tokens: int, vocab_size: int, hidden_size: int, dtype_bytes: int = 2,
    softcap: bool = False, weight_grad: bool = True,
) -> dict[str, int]:
    """Memory of ltune's chunked cross-entropy (ltune/trainer/chunked_loss.py) beyond its inputs
    and the two gradients it returns, by term (bytes); c = min(chunk_tokens, N), d the model
    dtype's bytes, u the bytes of a model-dtype copy of an fp32 tensor (d; 0 in fp32, where the
    casts return their input):

    - lse_bytes: the saved fp32 log-sum-exp, N x 4, alive from the loss forward to its backward;
    - forward_bytes: one chunk's logits at their forward peak, c x V x max(u + 4, 8) (the
      model-dtype logits beside their fp32 copy, then the fp32 logits beside logsumexp's
      same-size fp32 temporary, ATen logsumexp_out_impl);
    - backward_bytes: the larger of the fp32 chunk gradient being cast to the model dtype beside
      the fp32 weight-gradient accumulator, c x V x (4 + u) + V x h x 4, and the model-dtype
      chunk gradient beside the accumulator and one chunk's V x h product,
      c x V x d + V x h x (4 + d);
      with soft-capping (`softcap`), the fp32 chunk gradient beside its fp32 factor
      1 - (s / c)^2 and the accumulator, c x V x 8 + V x h x 4, before the cast;
    - peak_bytes: lse_bytes + max(forward_bytes, backward_bytes).

    With a frozen output layer (`weight_grad` False: LoRA, QLoRA) its backward makes no
    weight-gradient accumulator (chunked_loss.py: `need_weight`): c x V x (4 + u) only.

    Measured on an H200 (tests/test_chunked_loss.py, N 16384, V 128256, h 2048, c 4096, bf16):
    4.008 GiB peak allocated against 3.914 GiB peak_bytes + 0.0625 GiB for the hidden gradient;
    the full loss peaked at 23.48 GiB.
    """
    chunk_logits = min(chunk_tokens, num_tokens) * vocab_size
    weight_elems = vocab_size * hidden_size
    d, u = dtype_bytes, upcast_copy_bytes(dtype_bytes)
    forward = chunk_logits * max(u + FP32, 2 * FP32)
    if not weight_grad:
        weight_elems = 0
    backward = max(chunk_logits * (FP32 + u) + weight_elems * FP32, chunk_logits * d + weight_elems * (FP32 + d))
    if softcap:  # the in-place capped gradient and the new fp32 dcap (chunked_loss.py backward)
        backward = max(backward, chunk_logits * 2 * FP32 + weight_elems * FP32)
    lse = num_tokens * FP32
    return {"lse_bytes": lse, "forward_bytes": forward, "backward_bytes": backward, "peak_bytes": lse + max(forward, backward)}


def tied_output_grad_bytes(s: Shape) -> int:
    """With tied embeddings the output layer's weight gradient (model dtype) waits, through the
    whole layers' backward, for the embedding's backward to add its own (autograd sums
    the two uses of one leaf before AccumulateGrad, so ZeRO's hooks see it only then)."""
    return s.dtype_bytes * s.vocab_size * s.hidden_size if s.tie_word_embeddings else 0


# ---------------------------------------------------------------- LoRA / QLoRA adapters
# Frozen base weights change what autograd keeps: mm/addmm (torch autograd derivatives.yaml,
# `mm`: self needs mat2, mat2 needs self) save an operand only when the other one requires a
# gradient, so a frozen linear layer saves nothing of its input, a norm's `weight * x` does not
# keep x, and the first layer, whose input (a frozen embedding's output) needs no gradient, saves
# nothing before its first adapter (measured with `ltune trace`, tests/test_lora_activations.py).

ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj")
MLP_INPUTS = ("gate_proj", "up_proj", "gate_up_proj")


def adapter_inputs_saved_bytes_per_token(s: Shape, names: set[str], in_features: int, input_grad: bool) -> int:
    """What the adapters reading one input keep of it (peft lora/layer.py `Linear.forward`:
    lora_B(lora_A(dropout(x)))): without dropout (nn.Identity) the input itself, once, however
    many lora_A share it (d x in); with dropout each adapter's dropped copy (d x in) and, when the
    input requires a gradient, dropout's bool mask (1 x in, CUDA `native_dropout`)."""
    if not names:
        return 0
    if not s.lora_dropout:
        return s.dtype_bytes * in_features
    return len(names) * (s.dtype_bytes + (1 if input_grad else 0)) * in_features


def lora_layer_saved_bytes_per_token(s: Shape, lay: Layout, first_layer: bool = False) -> int:
    """Everything one decoder layer saves for backward under LoRA/QLoRA, per token (no recompute).

    Frozen norms keep their fp32 input (4h, for the rsqrt product) and not the normalised x;
    their output only where an adapter reads it; q, k, v, the attention output and lse as the
    kernel keeps them (it saves its inputs whatever their requires_grad); the gated MLP its gate,
    act(gate) and up (each only when its partner needs a gradient) and act(gate)*up where down_proj
    has an adapter; each adapter's low-rank lora_A output (r, saved by lora_B). `first_layer`: the
    input needs no gradient (frozen embedding) until the first adapter."""
    d, h, f = s.dtype_bytes, s.hidden_size, s.intermediate_size
    names = set(s.adapter_names)
    attn_in, mlp_in = names & set(ATTENTION_INPUTS), names & set(MLP_INPUTS)
    g_in = not first_layer
    saved = (FP32 * h if g_in else 0) + adapter_inputs_saved_bytes_per_token(s, attn_in, h, g_in)
    if s.qk_norm:
        q_grad = g_in or bool({"q_proj", "qkv_proj"} & names)
        k_grad = g_in or bool({"k_proj", "qkv_proj"} & names)
        saved += FP32 * (s.q_size + s.num_attention_heads) * q_grad + FP32 * (s.kv_size + s.kv_heads) * k_grad
    saved += attention_saved_bytes_per_token(s, lay)
    attn_grad = g_in or bool(attn_in)
    if s.lora_dropout and "o_proj" in names:  # the attention output itself counts above
        saved += adapter_inputs_saved_bytes_per_token(s, {"o_proj"}, s.q_size, attn_grad)
    o_grad = attn_grad or "o_proj" in names
    mid_grad = g_in or o_grad
    if s.norms_per_layer == 4:  # gemma's post-attention norm (on o_proj's output) and pre-feedforward norm
        saved += FP32 * h * o_grad + FP32 * h * mid_grad
    else:
        saved += FP32 * h * mid_grad
    saved += adapter_inputs_saved_bytes_per_token(s, mlp_in, h, mid_grad)
    gate_grad = mid_grad or bool({"gate_proj", "gate_up_proj"} & names)
    up_grad = mid_grad or bool({"up_proj", "gate_up_proj"} & names)
    saved += d * f * (gate_grad + up_grad + gate_grad)  # gate (act), act(gate) (mul, for up), up (mul, for act)
    if "down_proj" in names:
        saved += adapter_inputs_saved_bytes_per_token(s, {"down_proj"}, f, gate_grad or up_grad)
    if s.norms_per_layer == 4:  # post-feedforward norm, on down_proj's output
        saved += FP32 * h * (gate_grad or up_grad or "down_proj" in names)
    return saved + d * s.lora_rank * len(names)


def lora_checkpoints_bytes(s: Shape, lay: Layout) -> int:
    """Adapters: full recompute keeps each layer's input as for full fine-tuning; without it the
    first layer keeps less than the others (`lora_layer_saved_bytes_per_token`)."""
    t = tokens_per_rank(s, lay)
    if lay.recompute == "full":
        return s.num_layers * s.dtype_bytes * s.hidden_size * t
    layers = (s.num_layers - 1) * lora_layer_saved_bytes_per_token(s, lay) + lora_layer_saved_bytes_per_token(s, lay, True)
    per_layer_extra = eager_attention_bytes_per_layer(s, lay) + sdpa_math_bytes_per_layer(s, lay)["saved_bytes"]
    return layers * t + s.num_layers * per_layer_extra


def lora_backward_transient_bytes_per_token(s: Shape) -> int:
    """Gradients in flight at a layer's backward peak under adapters, in the MLP: the incoming
    hidden gradient (h) and three ffn-sized gradients (through down_proj's frozen weight and its
    adapter, and their sum; or those of act(gate)*up, act(gate) and up), less act(gate)*up and
    down_proj's lora_A output, released by then, where down_proj has an adapter (`ltune trace`)."""
    return s.dtype_bytes * (s.hidden_size + 3 * s.intermediate_size) - lora_down_released_bytes_per_token(s)


def lora_down_released_bytes_per_token(s: Shape) -> int:
    """What down_proj's backward has released by the MLP's backward peak where it has an adapter:
    act(gate)*up (its input, d x ffn) and its lora_A output (d x r) (`ltune trace`)."""
    return s.dtype_bytes * (s.intermediate_size + s.lora_rank) if "down_proj" in s.adapter_names else 0


def dequantized_weight_bytes(s: Shape) -> int:
    """QLoRA: the largest 4-bit weight dequantized whole to the compute dtype while its layer
    computes, forward and backward (bitsandbytes autograd/_functions.py `MatMul4Bit`,
    functional.py `dequantize_4bit`)."""
    return s.dtype_bytes * s.largest_quantized_params if s.method == "qlora" else 0


def lora_working_bytes(s: Shape, lay: Layout) -> int:
    """One layer's working set in backward under adapters: its recomputed tensors (full
    recompute) and the gradients in flight, at the larger of the MLP's peak and QLoRA's
    dequantized weight beside the incoming hidden gradient and two ffn-sized gradients (down_proj's
    backward: its adapter's input gradient, made first, and the one the frozen weight makes; by
    then act(gate)*up and down_proj's lora_A output are released, as in
    `lora_backward_transient_bytes_per_token`; `ltune trace`, tests/test_lora_activations.py)."""
    t = tokens_per_rank(s, lay)
    sdpa = sdpa_math_bytes_per_layer(s, lay)
    recomputed = 0
    if lay.recompute == "full":
        recomputed = lora_layer_saved_bytes_per_token(s, lay) * t + eager_attention_bytes_per_layer(s, lay) + sdpa["saved_bytes"]
    transient = lora_backward_transient_bytes_per_token(s) * t
    if s.gemma_norms:
        transient = max(transient, layer_backward_transient_bytes_per_token(s, lay.recompute == "full") * t)
    if s.method == "qlora":
        mlp = s.dtype_bytes * (s.hidden_size + 2 * s.intermediate_size) - lora_down_released_bytes_per_token(s)
        qlora = dequantized_weight_bytes(s) + mlp * t
        transient = max(transient, qlora)
    work = recomputed + transient
    return max(work, eager_backward_bytes_per_layer(s, lay), recomputed + sdpa["backward_temp_bytes"])


def lora_final_norm_bytes(s: Shape, lay: Layout) -> int:
    """The final norm under adapters: its fp32 input (its weight is frozen: the normalised x is not
    kept); its output only where the chunked loss saves it (chunked_loss.py saves its hidden input
    whatever needs a gradient; the full loss's frozen output layer keeps nothing of it)."""
    output = s.dtype_bytes if lay.loss == "chunked" else 0
    return (FP32 + output) * s.hidden_size * tokens_per_rank(s, lay)
