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


def layer_saved_bytes_per_token(s: Shape, lay: Layout) -> int:
    """Everything one decoder layer saves for backward, per token (no recompute)."""
    return (
        layer_norms_saved_bytes_per_token(s)
        + qk_norm_saved_bytes_per_token(s)
        + attention_saved_bytes_per_token(s, lay)
        + mlp_saved_bytes_per_token(s)
    )


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
    rope = 2 * d * t * (s.q_size // s.num_attention_heads) * (2 if s.local_rope else 1)
    masks = 2 if 0 < s.local_layers < s.num_layers else 1
    mask = masks * lay.micro_batch_size * s.seq_len * s.seq_len * d if lay.attention == "eager" else 0
    return rope + mask


def activation_checkpoints_bytes(s: Shape, lay: Layout) -> int:
    """Full recompute keeps each layer's input (Korthikanti et al.: 2sbh per layer in 16-bit);
    without recompute every layer keeps all it saves."""
    t = tokens_per_rank(s, lay)
    if lay.recompute == "full":
        return s.num_layers * s.dtype_bytes * s.hidden_size * t
    per_layer = layer_saved_bytes_per_token(s, lay) * t + eager_attention_bytes_per_layer(s, lay)
    return s.num_layers * (per_layer + sdpa_math_bytes_per_layer(s, lay)["saved_bytes"])


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
    """One layer's working set in backward: its recomputed activations (with full
    recompute) and the gradients in flight, at the larger of the MLP's and (eager)
    attention's backward peaks (eager, or SDPA's math backend per document on pre-Ampere GPUs)."""
    t = tokens_per_rank(s, lay)
    sdpa = sdpa_math_bytes_per_layer(s, lay)
    recomputed = 0
    if lay.recompute == "full":
        recomputed = layer_saved_bytes_per_token(s, lay) * t + eager_attention_bytes_per_layer(s, lay) + sdpa["saved_bytes"]
    work = layer_backward_transient_bytes_per_token(s, lay.recompute == "full") * t + recomputed
    return max(work, eager_backward_bytes_per_layer(s, lay), recomputed + sdpa["backward_temp_bytes"])


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
    m = chunked_loss_bytes(
        chunk_tokens=s.loss_chunk_tokens,
        num_tokens=t,
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        dtype_bytes=s.dtype_bytes,
        softcap=s.final_logit_softcapping,
    )
    return m["lse_bytes"] + max(m["forward_bytes"], m["backward_bytes"] + s.dtype_bytes * t * s.hidden_size)


def chunked_loss_bytes(
    *, chunk_tokens: int, num_tokens: int, vocab_size: int, hidden_size: int, dtype_bytes: int = 2,
    softcap: bool = False,
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

    Measured on an H200 (tests/test_chunked_loss.py, N 16384, V 128256, h 2048, c 4096, bf16):
    4.008 GiB peak allocated against 3.914 GiB peak_bytes + 0.0625 GiB for the hidden gradient;
    the full loss peaked at 23.48 GiB.
    """
    chunk_logits = min(chunk_tokens, num_tokens) * vocab_size
    weight_elems = vocab_size * hidden_size
    d, u = dtype_bytes, upcast_copy_bytes(dtype_bytes)
    forward = chunk_logits * max(u + FP32, 2 * FP32)
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
