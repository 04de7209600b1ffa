"""A memory-exact stand-in for flash-attn's varlen kernel, for tracing on CPU fake tensors.

Why: on CUDA the trainer runs `flash_attn_varlen_func`; on CPU (the only place the trace can run)
it falls back to one `scaled_dot_product_attention` per document, whose saved tensors and backward
temporaries differ from flash's (CPU sdpa picks its own backend, may expand GQA heads, and the
per-document slices and the concatenation of their outputs are copies flash never makes). Under
the trace, the kernel call is replaced by `flash_varlen_memory`, which computes nothing (its
outputs are uninitialised fake tensors) but allocates, saves and frees exactly what flash-attn 2
does, so the traced bytes are the CUDA bytes.

What flash-attn 2 allocates (Dao-AILab/flash-attention, csrc/flash_attn/flash_api.cpp,
`mha_varlen_fwd` / `mha_varlen_bwd`), for T packed tokens, H query heads, Hkv key/value heads,
head size D, B documents in the pack:
- forward: out (T, H, D) in the input dtype and softmax_lse (H, T) fp32; autograd keeps q, k, v,
  out and softmax_lse (and a 2 x int64 rng state) until backward;
- backward: dq, dk, dv like q, k, v; softmax_d (H, T + 128 B) fp32; dq_accum
  (T + 128 B, H, round_up(D, 32)) fp32; with grouped-query attention (Hkv < H) dk_expanded and
  dv_expanded (T, H, D) in the input dtype, summed into dk, dv.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


class _FlashVarlenMemory(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, num_docs: int) -> Tensor:
        total, heads, _ = q.shape
        out = torch.empty_like(q)
        lse = torch.empty((heads, total), dtype=torch.float32, device=q.device)
        rng_state = torch.empty(2, dtype=torch.int64, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse, rng_state)
        ctx.num_docs = num_docs
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse, rng_state = ctx.saved_tensors
        total, heads, head_dim = q.shape
        padded = total + 128 * ctx.num_docs
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        softmax_d = torch.empty((heads, padded), dtype=torch.float32, device=q.device)
        dq_accum = torch.empty((padded, heads, _round_up(head_dim, 32)), dtype=torch.float32, device=q.device)
        if k.shape[1] != heads:
            dk_expanded = torch.empty((k.shape[0], heads, head_dim), dtype=k.dtype, device=k.device)
            dv_expanded = torch.empty((v.shape[0], heads, v.shape[2]), dtype=v.dtype, device=v.device)
            del dk_expanded, dv_expanded
        del softmax_d, dq_accum
        return dq, dk, dv, None


def flash_varlen_memory(q: Tensor, k: Tensor, v: Tensor, num_docs: int) -> Tensor:
    """(T, H, D), (T, Hkv, D), (T, Hkv, D) -> (T, H, D) with flash-attn 2's memory, no arithmetic."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"expected (T, H, D) tensors; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if num_docs <= 0:
        raise ValueError(f"num_docs ({num_docs}) must be positive")
    return _FlashVarlenMemory.apply(q, k, v, num_docs)


def flash_attention_bytes(*, num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
                          num_docs: int, dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes flash-attn 2 varlen keeps and allocates, by what they are (same source as above)."""
    q = num_tokens * num_heads * head_dim * dtype_bytes
    kv = num_tokens * num_kv_heads * head_dim * dtype_bytes
    padded = num_tokens + 128 * num_docs
    return {
        "saved_bytes": q + 2 * kv + q + num_heads * num_tokens * 4,
        "backward_temp_bytes": padded * num_heads * (4 + _round_up(head_dim, 32) * 4)
        + (2 * num_tokens * num_heads * head_dim * dtype_bytes if num_kv_heads != num_heads else 0),
    }
