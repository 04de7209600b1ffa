"""Chunked (tiled) causal-LM cross-entropy that never holds the full tokens x vocabulary logits.

`chunked_cross_entropy(hidden, weight, labels, chunk_tokens, softcap=None)` returns the *sum* of the token
cross-entropies (fp32); the caller divides by the global count of real tokens.

Why our own autograd function rather than DeepSpeed's `TiledFusedLogitsLoss`
(deepspeed/runtime/sequence_parallel/ulysses_sp.py, 0.19.8): that one runs the backward of every
shard inside its forward and writes the lm-head weight gradient there, so the weight gradient does
not see the incoming gradient of the loss (a loss scale under fp16, or the division by the global
token count done after it), and it needs ZeRO-specific flags (`ds_grad_is_ready`). Here forward
keeps only the per-token log-sum-exp and backward recomputes each chunk, so every gradient is
scaled by the incoming gradient like any other autograd op. The recompute-the-logits idea is the
one of Liger's fused linear cross-entropy and of DeepSpeed's tiled loss; the code is ours.

Memory, per process, for N tokens, vocabulary V, hidden h, model dtype of d bytes, c = chunk_tokens
(`chunked_loss_bytes`, in ltune.planner.activations and re-exported here, gives the terms; hidden, weight and labels are saved by reference, being
alive anyway):
- saved between forward and backward: the fp32 log-sum-exp, N x 4 bytes;
- forward, one chunk at a time: the logits in the model dtype while they are upcast, then the fp32
  logits beside logsumexp's fp32 temporary: c x V x max(d + 4, 8) bytes (8 in fp32, where
  the upcast returns its input);
- backward, one chunk at a time, beside the fp32 V x h accumulator of the weight gradient (fp32
  accumulation keeps the sum over many chunks as accurate as one full matmul, which accumulates
  in fp32 inside the kernel; cast to the weight's dtype at the end): the fp32 logits turned in
  place into their gradient and cast to the model dtype for the two matmuls, and one chunk's V x h
  weight-gradient product in the model dtype.
The full loss (transformers' `ForCausalLMLoss`, which upcasts logits with `.float()`) holds
N x V x (d + 4) for logits and their fp32 copy, and a gradient of the same size.

Soft-capping (gemma2's final_logit_softcapping c): each chunk's fp32 logits z become
s = c * tanh(z / c) in place before the log-sum-exp; backward recomputes z, and the gradient
(softmax(s) - onehot) is multiplied by ds/dz = 1 - (s / c)^2, one more chunk x V fp32 buffer.

Under ZeRO-3 the weight must be gathered where this is called, in forward and in backward, as it is
for `F.linear`: call it inside the forward of the module that owns the weight (the trainer's
`LossHead` is the lm_head itself; tests/test_sequence_parallel.py checks a ZeRO-3 step through it
exactly) or of one that registered it with `deepspeed.zero.register_external_parameter`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..job.constants import IGNORE_INDEX
from ..planner.activations import chunked_loss_bytes

__all__ = ["IGNORE_INDEX", "chunked_cross_entropy", "chunked_loss_bytes"]


def _chunk_bounds(num_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_tokens, num_tokens)) for start in range(0, num_tokens, chunk_tokens)]


def _chunk_logits_fp32(hidden_chunk: Tensor, weight: Tensor) -> Tensor:
    """Logits of one chunk: the matmul in the model dtype, the result upcast to fp32."""
    logits = hidden_chunk @ weight.t()
    return logits if logits.dtype == torch.float32 else logits.float()


def _softcap_(logits: Tensor, softcap: float | None) -> Tensor:
    """softcap * tanh(logits / softcap) in place (Gemma2ForCausalLM.forward); as is when None."""
    if softcap is None:
        return logits
    return logits.div_(softcap).tanh_().mul_(softcap)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int, softcap: float | None
    ) -> Tensor:
        num_tokens = hidden.shape[0]
        lse = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start, end in _chunk_bounds(num_tokens, chunk_tokens):
            logits = _softcap_(_chunk_logits_fp32(hidden[start:end], weight), softcap)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            chunk_labels = labels[start:end]
            valid = chunk_labels != IGNORE_INDEX
            target = logits.gather(1, torch.where(valid, chunk_labels, 0).unsqueeze(1)).squeeze(1)
            del logits
            loss_sum += torch.where(valid, chunk_lse - target, 0.0).sum()
            lse[start:end] = chunk_lse
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_tokens = chunk_tokens
        ctx.softcap = softcap
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight_fp32 = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        )
        scale = grad_loss.float()
        for start, end in _chunk_bounds(hidden.shape[0], ctx.chunk_tokens):
            hidden_chunk = hidden[start:end]
            chunk_labels = labels[start:end]
            valid = chunk_labels != IGNORE_INDEX
            # d(lse - logit[target]) / d logits = softmax - onehot(target), zero on ignored tokens
            grad_logits = _softcap_(_chunk_logits_fp32(hidden_chunk, weight), ctx.softcap)
            # d softcap*tanh(z/softcap) / dz = 1 - (capped / softcap)^2
            dcap = None if ctx.softcap is None else (grad_logits / ctx.softcap).square_().neg_().add_(1.0)
            grad_logits.sub_(lse[start:end].unsqueeze(1)).exp_()
            rows = torch.arange(end - start, device=hidden.device)
            grad_logits[rows, torch.where(valid, chunk_labels, 0)] -= 1.0
            grad_logits.mul_((valid.to(torch.float32) * scale).unsqueeze(1))
            if dcap is not None:
                grad_logits.mul_(dcap)
                del dcap
            grad_logits = grad_logits.to(hidden.dtype)
            if need_hidden:
                grad_hidden[start:end] = grad_logits @ weight
            if need_weight:
                grad_weight_fp32 += grad_logits.t() @ hidden_chunk
            del grad_logits
        grad_weight = None
        if need_weight:
            grad_weight = grad_weight_fp32 if weight.dtype == torch.float32 else grad_weight_fp32.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int, softcap: float | None = None
) -> Tensor:
    """Sum over tokens of cross_entropy(hidden @ weight.T, labels), fp32, labels -100 ignored;
    with softcap c, of cross_entropy(c * tanh(hidden @ weight.T / c), labels).

    hidden (N, h) and weight (V, h) in the model dtype, labels (N,) already shifted (the label of
    token i is the token at i + 1). The logits are computed chunk_tokens rows at a time and never
    held whole; backward recomputes them. Returns a 0-dim fp32 tensor.
    """
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap ({softcap}) must be positive")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens ({chunk_tokens}) must be positive")
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(
            f"expected hidden (N, h), weight (V, h), labels (N,); got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if hidden.shape[0] != labels.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shapes do not match: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    return _ChunkedCrossEntropy.apply(hidden, weight, labels, chunk_tokens, softcap)
