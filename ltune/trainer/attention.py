"""Attention for packed sequences: one module, one switch.

The switch is the environment variable ``LTUNE_ATTENTION`` (auto | flash_attn |
torch_varlen | sdpa), or ``set_attention_backend(name)`` (tests):

- flash_attn: flash-attn's ``flash_attn_varlen_func`` (CUDA, when installed);
- torch_varlen: PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (CUDA only);
- sdpa: ``scaled_dot_product_attention`` run once per document (CPU, and a reference);
- auto: flash_attn if importable on CUDA, else torch_varlen on CUDA (with a one-time
  warning that flash-attn is absent), else sdpa (CPU, pre-Ampere GPUs, fp32 inputs).

Two layers, kept apart so that the Ulysses sequence-parallel wrapper
(``ltune.trainer.sequence_parallel``) can reuse the core:

- ``varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal, scale, sliding_window, softcap)``:
  the core, on (total_tokens, heads, head_dim) tensors; documents never attend to each other.
- ``hf_varlen_attention``: the transformers glue, registered with
  ``AttentionInterface`` under ``ATTN_IMPLEMENTATION``; it takes the document
  boundaries from the ``cu_seq_lens_q``/``max_length_q`` kwargs when the caller passes
  them (the trainer does, once per batch) and otherwise from ``position_ids`` restarts.

Per-layer variants, as transformers passes them to a registered attention function (the
model's attention module calls it with ``scaling=``, ``sliding_window=`` and ``softcap=``
keywords: Gemma2Attention.forward, Qwen3Attention, MistralAttention, Phi3Attention):

- ``scaling``: the softmax scale (gemma: query_pre_attn_scalar**-0.5, not head_dim**-0.5);
- ``sliding_window`` w: a query at position i sees keys j with i - w < j <= i, w tokens itself
  included (masking_utils.sliding_window_overlay: ``kv_idx > q_idx - sliding_window``);
  flash-attn and PyTorch's varlen take it as ``window_size=(w - 1, 0)`` (left, right), SDPA
  as an explicit boolean mask per document;
- ``softcap`` c: scores s = scale * q.k become c * tanh(s / c) before the softmax (gemma2's
  eager_attention_forward); flash-attn takes ``softcap=c``; PyTorch's varlen kernel and SDPA
  have no soft-capping, so those layers run an explicit per-document computation (scores,
  cap, mask, fp32 softmax), which holds heads x len x len scores per document: fine on a
  CPU, a warning on CUDA (install flash-attn).

Trap (transformers): packed sequences are only recognised when no KV cache is created,
so models must run with ``use_cache=False``. For our registered implementation
transformers builds no mask at all (masking_utils returns None for implementations it
does not know), so the boundaries come from cu_seqlens only.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "ltune_varlen"
BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa")
_ENV = "LTUNE_ATTENTION"
_override: str | None = None
_warned_no_flash = False
_warned_softcap = False


def set_attention_backend(name: str | None) -> None:
    """Force a backend (None: back to $LTUNE_ATTENTION or auto)."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(BACKENDS)}")
    _override = name


def requested_backend() -> str:
    name = _override or os.environ.get(_ENV, "auto")
    if name not in BACKENDS:
        raise ValueError(f"{_ENV}={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_backend(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """The backend that will run on ``device`` for ``dtype`` inputs."""
    global _warned_no_flash
    name = requested_backend()
    if name != "auto":
        if name in ("flash_attn", "torch_varlen") and device.type != "cuda":
            raise ValueError(f"attention backend {name!r} needs CUDA (tensors are on {device.type})")
        if name in ("flash_attn", "torch_varlen") and dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"attention backend {name!r} needs fp16 or bf16 (tensors are {dtype})")
        return name
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"  # flash kernels take 16-bit inputs only; fp32 runs SDPA per document
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "sdpa"  # flash-attn 2 and PyTorch's varlen kernel need Ampere (sm80) or newer
    if flash_attn_available():
        return "flash_attn"
    if not _warned_no_flash:
        warnings.warn("flash-attn is not installed: using torch.nn.attention.varlen (pip install flash-attn)")
        _warned_no_flash = True
    return "torch_varlen"


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Document boundaries of a packed (batch, seq) position_ids: (cu_seqlens int32, max_seqlen).

    A document starts wherever the position restarts at 0, and at every row start.
    """
    flat = position_ids.reshape(-1)
    seq = position_ids.shape[-1]
    starts = flat == 0
    starts[::seq] = True
    idx = torch.nonzero(starts, as_tuple=False).flatten()
    total = torch.tensor([flat.numel()], device=flat.device, dtype=idx.dtype)
    cu = torch.cat([idx, total]).to(torch.int32)
    max_seqlen = int((cu[1:] - cu[:-1]).max().item())
    return cu, max_seqlen


def allowed_keys(length: int, causal: bool, sliding_window: int | None, device) -> torch.Tensor | None:
    """(length, length) bool: query i may see key j (causal: j <= i; window w: j > i - w, the
    rule of transformers' sliding_window_overlay); None when every key is allowed."""
    if not causal and sliding_window is None:
        return None
    i = torch.arange(length, device=device).unsqueeze(1)
    j = torch.arange(length, device=device).unsqueeze(0)
    allowed = torch.ones(length, length, dtype=torch.bool, device=device)
    if causal:
        allowed &= j <= i
    if sliding_window is not None:
        allowed &= j > i - sliding_window
    return allowed


def _documents(q, k, v, cu_seqlens):
    """Each document's (heads, len, dim) q, k, v, kv heads repeated for GQA."""
    n_rep = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qd = q[start:end].transpose(0, 1)  # (heads, len, dim)
        kd = k[start:end].transpose(0, 1)
        vd = v[start:end].transpose(0, 1)
        if n_rep > 1:
            kd = kd.repeat_interleave(n_rep, dim=0)
            vd = vd.repeat_interleave(n_rep, dim=0)
        yield qd, kd, vd


def _sdpa_per_document(q, k, v, cu_seqlens, causal, scale, sliding_window=None):
    outs = []
    for qd, kd, vd in _documents(q, k, v, cu_seqlens):
        if sliding_window is None or sliding_window >= qd.shape[1]:  # the window covers the document
            od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=scale)
        else:
            mask = allowed_keys(qd.shape[1], causal, sliding_window, qd.device)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)
        outs.append(od.transpose(0, 1))
    return torch.cat(outs, dim=0)


def _softcapped_per_document(q, k, v, cu_seqlens, causal, scale, sliding_window, softcap):
    """Scores, softcap * tanh(scores / softcap), mask, fp32 softmax, per document (gemma2's
    eager_attention_forward, restricted to one document)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    for qd, kd, vd in _documents(q, k, v, cu_seqlens):
        scores = torch.matmul(qd, kd.transpose(1, 2)) * scale
        scores = torch.tanh(scores / softcap) * softcap
        mask = allowed_keys(qd.shape[1], causal, sliding_window, qd.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qd.dtype)
        outs.append(torch.matmul(probs, vd).transpose(0, 1))
    return torch.cat(outs, dim=0)


def _flash_window(causal: bool, sliding_window: int | None) -> tuple[int, int]:
    """flash-attn's (left, right) window_size: w tokens, the query's own included, is (w - 1, 0)."""
    if sliding_window is None:
        return (-1, 0) if causal else (-1, -1)
    return (sliding_window - 1, 0 if causal else sliding_window - 1)


def _flash_attn(q, k, v, cu_seqlens, max_seqlen, causal, scale, sliding_window=None, softcap=None):
    from flash_attn import flash_attn_varlen_func

    kwargs = {}  # only when used: flash-attn < 2.6 has no softcap argument
    if sliding_window is not None:
        kwargs["window_size"] = _flash_window(causal, sliding_window)
    if softcap is not None:
        kwargs["softcap"] = softcap
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.0, softmax_scale=scale, causal=causal,
        **kwargs,
    )


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale, sliding_window=None):
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs = {"scale": scale}
    if "window_size" in params:  # torch >= 2.11: window (-1, 0) is causal, (-1, -1) full, (w - 1, 0) w tokens
        kwargs["window_size"] = _flash_window(causal, sliding_window)
    elif sliding_window is not None:  # torch 2.10 has no window: an explicit mask per document
        return _sdpa_per_document(q, k, v, cu_seqlens, causal, scale, sliding_window)
    else:  # torch 2.10
        kwargs["is_causal"] = causal
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            n_rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def one_head_size(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args) -> torch.Tensor:
    """`kernel(q, k, v, *args)` for a kernel that takes one head size for q, k and v (flash-attn,
    PyTorch's varlen kernel), with multi-head latent attention's smaller value heads: v
    zero-padded to the q/k head size, the output cut back to v's (what transformers does for
    flash_attention_2, modeling_deepseek_v2.py)."""
    value_dim = v.shape[-1]
    if value_dim == q.shape[-1]:
        return kernel(q, k, v, *args)
    if value_dim > q.shape[-1]:
        raise ValueError(f"value head size ({value_dim}) above the query/key head size ({q.shape[-1]})")
    return kernel(q, k, F.pad(v, [0, q.shape[-1] - value_dim]), *args)[..., :value_dim]


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = True,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention within documents of a packed batch.

    q: (total_tokens, heads, head_dim); k: (total_tokens, kv_heads, head_dim), v: (total_tokens,
    kv_heads, value_dim) with kv_heads dividing heads (GQA) and value_dim at most head_dim (MLA's
    v_head_dim; otherwise head_dim). cu_seqlens: int32 (num_docs + 1) boundaries.
    sliding_window w: a query sees its own and the w - 1 previous keys of its document;
    softcap c: scores capped to c * tanh(scores / c) before the softmax.
    Returns (total_tokens, heads, value_dim).
    """
    global _warned_softcap
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"kv heads ({k.shape[1]}) must divide query heads ({q.shape[1]})")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window ({sliding_window}) must be at least 1")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap ({softcap}) must be positive")
    backend = resolve_backend(q.device, q.dtype)
    if v.shape[-1] != q.shape[-1] and backend in ("flash_attn", "torch_varlen"):
        # SDPA and the explicit per-document paths take v's own size
        return one_head_size(varlen_attention, q, k, v, cu_seqlens, max_seqlen, causal, scale, sliding_window, softcap)
    if backend == "flash_attn":
        return _flash_attn(q, k, v, cu_seqlens, max_seqlen, causal, scale, sliding_window, softcap)
    if softcap is not None:  # neither PyTorch's varlen kernel nor SDPA soft-caps
        if q.device.type == "cuda" and not _warned_softcap:
            warnings.warn("attention soft-capping without flash-attn: explicit per-document attention, "
                          "len x len scores per head (pip install flash-attn)")
            _warned_softcap = True
        return _softcapped_per_document(q, k, v, cu_seqlens, causal, scale, sliding_window, softcap)
    if backend == "torch_varlen":
        return _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale, sliding_window)
    return _sdpa_per_document(q, k, v, cu_seqlens, causal, scale, sliding_window)


def hf_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
):
    """transformers attention function: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out;
    the layer's own scaling, sliding_window and softcap as its attention module passes them."""
    if dropout:
        raise ValueError(f"attention dropout ({dropout}) is not supported by {ATTN_IMPLEMENTATION}")
    batch, heads, seq, dim = query.shape
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    max_seqlen = kwargs.get("max_length_q")
    if cu_seqlens is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(seq, device=query.device).expand(batch, seq)
        cu_seqlens, max_seqlen = cu_seqlens_from_position_ids(position_ids)
    value_dim = value.shape[-1]  # MLA (deepseek_v2/v3): v_head_dim, not q/k's nope + rope
    q = query.transpose(1, 2).reshape(batch * seq, heads, dim)
    k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], value_dim)
    out = varlen_attention(
        q, k, v, cu_seqlens, int(max_seqlen), causal=True, scale=scaling, sliding_window=sliding_window, softcap=softcap
    )
    return out.view(batch, seq, heads, value_dim), None


def register_with_transformers() -> str:
    """Register ``hf_varlen_attention``; returns the name to use as attn_implementation."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, hf_varlen_attention)
    return ATTN_IMPLEMENTATION
