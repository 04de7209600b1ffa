"""Packed sequences: the losses of a packed batch equal those of its documents run alone.

Single process, fp32, no DeepSpeed: the attention + loss path of the trainer's model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ltune.trainer import attention
from ltune.trainer.attention import cu_seqlens_from_position_ids, varlen_attention
from ltune.trainer.loss import IGNORE_INDEX, causal_lm_loss, shift_labels
from ltune.trainer.model import build_model

DOC_LENGTHS = (37, 1, 58, 32)  # one of a single token (predicts nothing); 128 in all


@pytest.fixture(autouse=True)
def _sdpa_backend():
    attention.set_attention_backend("sdpa")
    yield
    attention.set_attention_backend(None)


def _docs(vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (n,), generator=gen) for n in DOC_LENGTHS]


def _model(plan_factory, attention_kind: str, recompute: str = "none"):
    plan = plan_factory(
        layout={"num_gpus": 1, "zero_stage": 0, "attention": attention_kind, "recompute": recompute},
        training={"seq_len": sum(DOC_LENGTHS), "max_steps": 1},
    )
    model = build_model(plan).float()
    return model, plan.model.architecture.vocab_size


def _token_losses(model, ids, pos, use_cu: bool):
    """Per-position loss (0 where there is no target) and the hidden states."""
    labels = shift_labels(ids, pos)
    kwargs = {}
    if use_cu:
        cu, max_len = cu_seqlens_from_position_ids(pos)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    hidden = model.lm.model(input_ids=ids, position_ids=pos, use_cache=False, **kwargs).last_hidden_state
    logits = F.linear(hidden, model.lm.lm_head.weight).float()
    losses = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return losses, hidden[0], labels


@pytest.mark.parametrize("attention_kind,use_cu", [("varlen", True), ("varlen", False), ("eager", False)])
def test_packed_equals_per_document(plan_factory, attention_kind, use_cu):
    model, vocab = _model(plan_factory, attention_kind)
    docs = _docs(vocab)
    ids = torch.cat(docs).unsqueeze(0)
    pos = torch.cat([torch.arange(len(d)) for d in docs]).unsqueeze(0)
    packed_losses, packed_hidden, _ = _token_losses(model, ids, pos, use_cu)
    start = 0
    for doc in docs:
        n = len(doc)
        alone_losses, alone_hidden, _ = _token_losses(model, doc.unsqueeze(0), torch.arange(n).unsqueeze(0), use_cu)
        torch.testing.assert_close(packed_hidden[start : start + n], alone_hidden, rtol=0, atol=1e-5)
        torch.testing.assert_close(packed_losses[start : start + n], alone_losses, rtol=0, atol=1e-5)
        start += n
    # the last token of each document predicts nothing (never the next document's first)
    ends = torch.tensor(DOC_LENGTHS).cumsum(0) - 1
    assert torch.all(packed_losses[ends] == 0)


def test_packed_gradients_equal_sum_over_documents(plan_factory):
    model, vocab = _model(plan_factory, "varlen", recompute="full")
    docs = _docs(vocab)
    ids = torch.cat(docs).unsqueeze(0)
    pos = torch.cat([torch.arange(len(d)) for d in docs]).unsqueeze(0)
    labels = shift_labels(ids, pos)
    cu, max_len = cu_seqlens_from_position_ids(pos)
    loss_sum, n_tokens = model(ids, pos, labels, cu, max_len)
    assert int(n_tokens) == sum(n - 1 for n in DOC_LENGTHS)
    loss_sum.backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    total = 0.0
    for doc in docs:
        d_ids, d_pos = doc.unsqueeze(0), torch.arange(len(doc)).unsqueeze(0)
        s, _ = model(d_ids, d_pos, shift_labels(d_ids, d_pos), *cu_seqlens_from_position_ids(d_pos))
        s.backward()
        total += float(s.detach())
    assert float(loss_sum.detach()) == pytest.approx(total, rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed[name], p.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_varlen_core_matches_masked_dense_attention():
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 9, 2]
    total, heads, kv_heads, dim = sum(lengths), 4, 2, 8
    q = torch.randn(total, heads, dim, generator=gen)
    k = torch.randn(total, kv_heads, dim, generator=gen)
    v = torch.randn(total, kv_heads, dim, generator=gen)
    cu = torch.tensor([0, 5, 14, 16], dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, max(lengths))
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, kr) / dim**0.5
    ref = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), vr)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cu_seqlens_from_position_ids_rows_and_restarts():
    pos = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]])  # row 2 starts mid-document
    cu, max_len = cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 3, 5, 7, 10]
    assert cu.dtype == torch.int32 and max_len == 3


def test_backend_switch():
    attention.set_attention_backend("torch_varlen")
    with pytest.raises(ValueError, match="needs CUDA"):
        attention.resolve_backend(torch.device("cpu"))
    attention.set_attention_backend(None)
    assert attention.resolve_backend(torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="not one of"):
        attention.set_attention_backend("magic")


def test_fp32_runs_sdpa_per_document():
    """Flash kernels take 16-bit inputs only: auto picks SDPA for fp32, an explicit kernel is refused
    (decided from the dtype before any CUDA call, so this runs without a GPU)."""
    attention.set_attention_backend(None)
    assert attention.resolve_backend(torch.device("cuda"), torch.float32) == "sdpa"
    attention.set_attention_backend("torch_varlen")
    try:
        with pytest.raises(ValueError, match="needs fp16 or bf16"):
            attention.resolve_backend(torch.device("cuda"), torch.float32)
    finally:
        attention.set_attention_backend(None)


def test_chunked_loss_mode():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 16, 8, generator=gen)
    weight = torch.randn(32, 8, generator=gen)
    labels = torch.randint(0, 32, (2, 16), generator=gen)
    labels[0, :5] = IGNORE_INDEX
    full, n = causal_lm_loss(hidden, weight, labels, "full")
    assert int(n) == 27
    ref = F.cross_entropy((hidden.view(-1, 8) @ weight.T), labels.view(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(full, ref)
    chunked, n2 = causal_lm_loss(hidden, weight, labels, "chunked", chunk_tokens=5)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert int(n2) == 27


def test_shift_labels_stays_inside_documents():
    labels = torch.tensor([[10, 11, 12, 20, 21, IGNORE_INDEX, 30]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 0]])
    assert shift_labels(labels, pos).tolist() == [[11, 12, IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
