"""Activation, logits and loss terms of the per-GPU memory, one function per term.

Counted tensor by tensor from the Llama decoder layer as transformers implements it
(modeling_llama.py), in the style of Korthikanti et al. 2022 (arXiv 2205.05198), and
checked against `ltune trace` (bench/accuracy.py).
"""

from __future__ import annotations

from .schema import Layout
from .shape import FP32, HALF, Shape, tokens_per_rank

# Korthikanti et al. count 34*s*b*h for a GPT layer; the gated MLP and GQA change the sum.


def rmsnorm_saved_bytes_per_token(s: Shape) -> int:
    """RMSNorm upcasts to fp32 and saves it (4h), the normalised 16-bit x (2h), and
    its output is saved by the next linear layer (2h)."""
    return 8 * s.hidden


def attention_saved_bytes_per_token(s: Shape, lay: Layout) -> int:
    """Varlen flash attention saves q, k, v (after RoPE), its output and an fp32
    logsumexp per head (Dao 2023, FlashAttention-2); RoPE saves only cos/sin. Eager
    attention (transformers' eager_attention_forward) saves q, k and v repeated to all
    query heads (repeat_kv) and the attention output, 16-bit (its scores: see
    eager_attention_bytes_per_layer)."""
    if lay.attention == "eager":
        return HALF * 4 * s.q_size
    return HALF * (2 * s.q_size + 2 * s.kv_size) + FP32 * s.heads


def mlp_saved_bytes_per_token(s: Shape) -> int:
    """SwiGLU saves gate, silu(gate), up and their product: 4 x ffn 16-bit values."""
    return 4 * HALF * s.ffn


def layer_saved_bytes_per_token(s: Shape, lay: Layout) -> int:
    """Everything one decoder layer saves for backward, per token (no recompute)."""
    return 2 * rmsnorm_saved_bytes_per_token(s) + attention_saved_bytes_per_token(s, lay) + mlp_saved_bytes_per_token(s)


def eager_attention_bytes_per_layer(s: Shape, lay: Layout) -> int:
    """Eager attention keeps the fp32 softmax (4) and its 16-bit copy (2) for each of
    the heads on this rank over the whole packed sequence: quadratic in its length."""
    if lay.attention != "eager":
        return 0
    heads_here = s.heads // lay.sp_degree
    return lay.micro_batch_size * heads_here * s.seq_len * s.seq_len * (FP32 + HALF)


def layer_backward_transient_bytes_per_token(s: Shape) -> int:
    """Gradients in flight at a layer's backward peak, inside the gated MLP's backward
    right after down_proj's: the incoming hidden gradient (h), the gradient of
    act(gate)*up (ffn) and those of act(gate) and up (2 ffn), less act(gate)*up itself
    (ffn), which down_proj's backward has released; the outgoing hidden gradient is not
    made yet (measured with `ltune trace`, bench/accuracy.py)."""
    return HALF * (s.hidden + 2 * s.ffn)


def shared_layer_inputs_bytes(s: Shape, lay: Layout) -> int:
    """Inputs every layer reads, made once: RoPE cos and sin (16-bit, head_dim per token)
    and, for eager attention, transformers' additive 16-bit mask over the whole sequence."""
    t = tokens_per_rank(s, lay)
    rope = 2 * HALF * t * (s.q_size // s.heads)
    mask = lay.micro_batch_size * s.seq_len * s.seq_len * HALF if lay.attention == "eager" else 0
    return rope + mask


def activation_checkpoints_bytes(s: Shape, lay: Layout) -> int:
    """Full recompute keeps each layer's 16-bit input (Korthikanti et al.: 2sbh per layer);
    without recompute every layer keeps all it saves."""
    t = tokens_per_rank(s, lay)
    if lay.recompute == "full":
        return s.layers * HALF * s.hidden * t
    per_layer = layer_saved_bytes_per_token(s, lay) * t + eager_attention_bytes_per_layer(s, lay)
    return s.layers * per_layer


def eager_backward_bytes_per_layer(s: Shape, lay: Layout) -> int:
    """Eager attention's own backward peak, at the softmax backward: the saved fp32
    softmax, the fp32 gradient of the probabilities and the fp32 softmax gradient
    (3 x 4 bytes per score; the 16-bit probabilities are released by then), beside the
    layer's input norm (8h), q and the repeated k (2 x q), the gradient of the attention
    output (q) and the incoming hidden gradient (h), 16-bit. Without recompute the saved
    fp32 softmax and 16-bit probabilities already count in the checkpoints."""
    if lay.attention != "eager":
        return 0
    t = tokens_per_rank(s, lay)
    scores = eager_attention_bytes_per_layer(s, lay) // (FP32 + HALF)
    if lay.recompute == "full":
        return 3 * FP32 * scores + HALF * t * (5 * s.hidden + 3 * s.q_size)
    return (2 * FP32 - HALF) * scores + HALF * t * (s.hidden + 2 * s.q_size)


def activation_working_bytes(s: Shape, lay: Layout) -> int:
    """One layer's working set in backward: its recomputed activations (with full
    recompute) and the gradients in flight, at the larger of the MLP's and (eager)
    attention's backward peaks."""
    t = tokens_per_rank(s, lay)
    work = layer_backward_transient_bytes_per_token(s) * t
    if lay.recompute == "full":
        work += layer_saved_bytes_per_token(s, lay) * t + eager_attention_bytes_per_layer(s, lay)
    return max(work, eager_backward_bytes_per_layer(s, lay))


def final_norm_bytes(s: Shape, lay: Layout) -> int:
    """The final RMSNorm's saved tensors, live from the last layer to the loss backward."""
    return rmsnorm_saved_bytes_per_token(s) * tokens_per_rank(s, lay)


# ---------------------------------------------------------------- logits and loss


def logits_loss_bytes(s: Shape, lay: Layout) -> int:
    """The output layer and cross-entropy at their peak (the loss backward).

    Full: transformers' ForCausalLMLoss upcasts the 16-bit logits to fp32 and runs
    log-softmax (reference.md); its backward holds the fp32 log-probabilities, their
    gradient and the input gradient at once: 3 x 4 bytes per logit (Megatron-LM counts
    the fp32 cross-entropy at 4*s*b*V).

    Chunked (ltune/trainer/chunked_loss.py, whose `chunked_loss_bytes` gives the same
    moments), c = min(chunk_tokens, t): the fp32 logsumexp per token (4t) plus the largest
    of three moments: forward, the chunk's fp32 logits and logsumexp's same-size fp32
    temporary (8cV; ATen logsumexp_out_impl); backward, the chunk's fp32 gradient and its
    16-bit cast (6cV) beside the fp32 weight-gradient accumulator (4Vh) and the 16-bit
    hidden gradient (2th); backward, the 16-bit chunk gradient (2cV), the accumulator and
    one chunk's 16-bit V x h product (6Vh), and the hidden gradient. Measured with
    `ltune trace` and on an H200 (V 128256, h 2048, 16384 tokens, chunks of 4096: full
    23.48 GiB, this term 23.49; chunked 4.01 GiB, this term 3.98).
    """
    t = tokens_per_rank(s, lay)
    if lay.loss == "full":
        return 3 * FP32 * s.vocab * t
    cv, vh, th = min(s.chunk_tokens, t) * s.vocab, s.vocab * s.hidden, t * s.hidden
    return FP32 * t + max(
        2 * FP32 * cv,
        (HALF + FP32) * cv + FP32 * vh + HALF * th,
        HALF * cv + (FP32 + HALF) * vh + HALF * th,
    )


def tied_output_grad_bytes(s: Shape) -> int:
    """With tied embeddings the output layer's 16-bit weight gradient waits, through the
    whole layers' backward, for the embedding's backward to add its own (autograd sums
    the two uses of one leaf before AccumulateGrad, so ZeRO's hooks see it only then)."""
    return HALF * s.vocab * s.hidden if s.tied else 0
