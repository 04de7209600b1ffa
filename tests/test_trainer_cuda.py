"""The CUDA kernels of the attention switch against the per-document reference (GPU only).

Needs only torch (and flash-attn when installed); skipped where CUDA is absent.
Run on a GPU machine: ``python -m pytest tests/test_trainer_cuda.py``; bench/gpu_validate.sh
runs it (``pytest -m gpu``) in its device call.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from ltune.trainer import attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DOC_LENGTHS = [100, 1, 300, 623, 24]


def _backends() -> list[str]:
    out = []
    if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
        out.append("torch_varlen")
    if attention.flash_attn_available():
        out.append("flash_attn")
    return out


def _inputs(heads=8, kv_heads=2, dim=64, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(0)
    total = sum(DOC_LENGTHS)
    q, k, v = (
        torch.randn(total, h, dim, device="cuda", dtype=dtype, generator=gen).requires_grad_()
        for h in (heads, kv_heads, kv_heads)
    )
    cu = torch.tensor([0, *torch.tensor(DOC_LENGTHS).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    return q, k, v, cu, max(DOC_LENGTHS)


def _run(backend, q, k, v, cu, max_len):
    attention.set_attention_backend(backend)
    try:
        out = attention.varlen_attention(q, k, v, cu, max_len)
    finally:
        attention.set_attention_backend(None)
    grad_out = torch.ones_like(out).mul_(0.01)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, dq, dk, dv


@pytest.mark.parametrize("backend", _backends() or ["none"])
def test_cuda_varlen_matches_per_document_sdpa(backend):
    if backend == "none":
        pytest.skip("no CUDA varlen kernel in this torch")
    q, k, v, cu, max_len = _inputs()
    ref = _run("sdpa", *(t.detach().float().requires_grad_() for t in (q, k, v)), cu, max_len)
    got = _run(backend, q, k, v, cu, max_len)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2, msg=f"{backend} {name}")


def test_auto_picks_a_cuda_kernel_and_warns_without_flash_attn():
    attention._warned_no_flash = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = attention.resolve_backend(torch.device("cuda"))
    if attention.flash_attn_available():
        assert chosen == "flash_attn" and not caught
    else:
        assert chosen == "torch_varlen"
        assert any("flash-attn is not installed" in str(w.message) for w in caught)

