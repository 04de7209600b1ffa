"""Ulysses sequence parallelism on packed documents: batch sharding, the varlen core behind
DeepSpeed's UlyssesSPAttentionHF, the loss reduction, and the refusal of a bad sp degree.

The distributed test starts 2 processes over gloo (one launch) and checks, for a tiny llama in fp32
on a packed batch whose documents straddle the shard boundary:
- sp 2 (DeepSpeed's all-to-all, varlen core, chunked loss) against the same documents run one at a
  time through stock transformers (sdpa): loss and every parameter gradient to 1e-5;
- the same through DeepSpeed ZeRO-3 and ZeRO-2 engines given the sequence-parallel mpu: one SGD
  step of lr 1 moves every parameter by exactly the reference gradient (so `sp_mean_loss` with
  `engine_sp_grad_scale` matches how DeepSpeed reduces gradients over the sp group).
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from ltune.trainer.sequence_parallel import (
    cu_seqlens_from_position_ids,
    hf_varlen_attention,
    shard_batch,
    shift_labels,
)

from conftest import make_plan, tiny_arch

VOCAB = 96
DOC_LENGTHS = [[10, 20, 15], [7, 30, 8]]  # 45 tokens a row: padded to 46, shards of 23 split documents
SP_DEGREE = 2
CHUNK_TOKENS = 7
TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- fixtures shared with the workers


def reference_varlen_core(q, k, v, cu_seqlens, max_seqlen, causal=True, scale=None):
    """Per-document causal sdpa on (tokens, heads, head_dim): the CPU reference the trainer's
    varlen core must match."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=scale)
        out[start:end] = od.squeeze(0).transpose(0, 1)
    return out


def tiny_llama(kv_heads: int = 2, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        initializer_range=0.1,  # larger than the default so that attention is far from uniform
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def packed_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    rows = len(DOC_LENGTHS)
    seq = sum(DOC_LENGTHS[0])
    input_ids = torch.randint(1, VOCAB, (rows, seq), generator=gen)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in DOC_LENGTHS])
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt without loss
    labels[1, 10:14] = -100
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def per_document_loss(model, batch) -> torch.Tensor:
    """Mean next-token loss over all real targets, each document run alone through the model."""
    loss_sum, count = 0.0, 0
    for row, lengths in enumerate(DOC_LENGTHS):
        start = 0
        for length in lengths:
            ids = batch["input_ids"][row, start : start + length].unsqueeze(0)
            targets = batch["labels"][row, start + 1 : start + length]
            logits = model(input_ids=ids).logits[0, :-1].float()
            loss_sum = loss_sum + F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
            count += int((targets != -100).sum())
            start += length
    return loss_sum / count


def use_attention(model, fn, key: str):
    from transformers import AttentionInterface

    AttentionInterface.register(key, fn)
    model.config._attn_implementation = key
    return model


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- unit tests (no processes)


def test_shift_labels_stay_inside_documents():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    labels = torch.tensor([[10, 11, 12, 20, -100, 30, 31, 32]])
    assert shift_labels(labels, position_ids).tolist() == [[11, 12, -100, -100, -100, 31, 32, -100]]


def test_cu_seqlens_flatten_rows_and_split_at_position_resets():
    position_ids = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    cu_seqlens, max_seqlen = cu_seqlens_from_position_ids(position_ids)
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 3, 5, 7, 10] and max_seqlen == 3
    # a row that starts mid-document (a split document) still starts a segment
    cu_seqlens, _ = cu_seqlens_from_position_ids(torch.tensor([[5, 6, 0, 1], [7, 8, 9, 10]]))
    assert cu_seqlens.tolist() == [0, 2, 4, 8]


def test_shards_cover_the_padded_batch():
    batch = packed_batch()
    full = shard_batch(batch, 0, 1)
    assert torch.equal(full["input_ids"], batch["input_ids"])
    shards = [shard_batch(batch, r, 4) for r in range(4)]  # 45 tokens -> 48, shards of 12
    for key in ("input_ids", "position_ids", "shift_labels"):
        joined = torch.cat([s[key] for s in shards], dim=1)
        assert joined.shape == (2, 48)
    joined_labels = torch.cat([s["shift_labels"] for s in shards], dim=1)
    assert torch.equal(joined_labels[:, :45], full["shift_labels"])
    assert (joined_labels[:, 44:] == -100).all()  # last real token and the padding: no target
    assert torch.equal(torch.cat([s["position_ids"] for s in shards], dim=1)[:, 45:], torch.arange(3).expand(2, 3))
    # every shard carries the cu_seqlens of the whole padded batch: 5 documents + 2 padding segments
    assert shards[0]["cu_seqlens"].tolist() == [0, 10, 30, 45, 48, 55, 85, 93, 96]
    assert all(torch.equal(s["cu_seqlens"], shards[0]["cu_seqlens"]) for s in shards)
    with pytest.raises(ValueError, match=r"sp_rank \(2\)"):
        shard_batch(batch, 2, 2)


def test_varlen_attention_of_a_pack_equals_documents_one_by_one():
    """The transformers adapter around a varlen core: packed loss and gradients equal per-document
    runs with stock sdpa (1e-5, fp32); a core that ignores boundaries is caught."""
    base = tiny_llama()
    batch = packed_batch()
    full = shard_batch(batch, 0, 1)

    reference = copy.deepcopy(base)
    per_document_loss(reference, batch).backward()

    def packed_loss(model):
        logits = model(input_ids=full["input_ids"], position_ids=full["position_ids"]).logits.float()
        return F.cross_entropy(logits.flatten(0, 1), full["shift_labels"].flatten(), ignore_index=-100)

    packed = use_attention(copy.deepcopy(base), hf_varlen_attention(reference_varlen_core), "ltune_test_varlen")
    loss = packed_loss(packed)
    loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(loss, per_document_loss(base, batch), **TOL)
    expected = grads_of(reference)
    for name, grad in grads_of(packed).items():
        torch.testing.assert_close(grad, expected[name], **TOL, msg=f"grad of {name}")

    def leaky_core(q, k, v, cu_seqlens, max_seqlen, causal=True, scale=None):
        rows = torch.arange(0, q.shape[0] + 1, q.shape[0] // len(DOC_LENGTHS), dtype=torch.int32)
        return reference_varlen_core(q, k, v, rows, max_seqlen, causal, scale)

    leaky = use_attention(copy.deepcopy(base), hf_varlen_attention(leaky_core), "ltune_test_leaky")
    with torch.no_grad():
        assert abs(packed_loss(leaky).item() - loss.item()) > 1e-3


def test_sp_degree_not_dividing_heads_is_refused():
    with pytest.raises(ValueError, match=r"sp_degree \(3\) must divide num_attention_heads \(4\)"):
        make_plan(arch=tiny_arch(), layout={"num_gpus": 3, "sp_degree": 3})
    with pytest.raises(ValueError, match=r"sp_degree \(4\) must divide num_gpus \(2\)"):
        make_plan(arch=tiny_arch(), layout={"num_gpus": 2, "sp_degree": 4})
    with pytest.raises(ValueError, match=r"sp_degree \(2\) must divide num_kv_heads \(3\)"):
        make_plan(arch=tiny_arch(num_attention_heads=6, num_kv_heads=3), layout={"num_gpus": 2, "sp_degree": 2})
    plan = make_plan(arch=tiny_arch(), layout={"num_gpus": 2, "sp_degree": 2})
    assert plan.layout.sp_degree == 2 and plan.layout.dp_degree == 1


# ---------------------------------------------------------------- distributed (2 processes, gloo)


class _LMWithChunkedLoss(torch.nn.Module):
    """A transformers causal LM body, then the chunked loss: (loss sum, real-token count)."""

    def __init__(self, hf_model, chunk_tokens: int):
        super().__init__()
        from ltune.trainer.chunked_loss import ChunkedLMHeadLoss

        self.hf = hf_model
        self.loss_head = ChunkedLMHeadLoss(hf_model.lm_head, chunk_tokens)

    def forward(self, input_ids, position_ids, shift_labels):
        hidden = self.hf.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        return self.loss_head(hidden, shift_labels)


def _sp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    import deepspeed
    import deepspeed.comm as dist

    from ltune.trainer.sequence_parallel import (
        engine_sp_grad_scale,
        init_sp_groups,
        install_ulysses_attention,
        sp_mean_loss,
    )

    deepspeed.init_distributed(dist_backend="gloo")
    mpu = init_sp_groups(SP_DEGREE)
    sp_group, sp_rank = mpu.get_sequence_parallel_group(), mpu.get_sequence_parallel_rank()
    batch = packed_batch()
    shard = shard_batch(batch, sp_rank, SP_DEGREE)
    base = tiny_llama()
    micro_batch = batch["input_ids"].shape[0]

    # reference: every document alone through stock transformers
    reference = copy.deepcopy(base)
    ref_loss = per_document_loss(reference, batch)
    ref_loss.backward()
    result = {"ref_loss": ref_loss.detach(), "ref_grads": grads_of(reference), "local_tokens": shard["input_ids"].shape[1]}

    # sp 2 by hand: Ulysses attention (DeepSpeed's all-to-all), chunked loss, sum of grads over the group
    sp_model = copy.deepcopy(base)
    install_ulysses_attention(sp_model, sp_group, micro_batch, core=reference_varlen_core)
    lm = _LMWithChunkedLoss(sp_model, CHUNK_TOKENS)
    loss_sum, count = lm(shard["input_ids"], shard["position_ids"], shard["shift_labels"])
    loss, loss_value = sp_mean_loss(loss_sum, count, sp_group)
    loss.backward()
    grads = grads_of(sp_model)
    for grad in grads.values():
        dist.all_reduce(grad, group=sp_group)
    result.update(sp_loss=loss_value.detach(), sp_grads=grads)

    # sp 2 through DeepSpeed engines given the mpu (ZeRO-3, then ZeRO-2): one SGD step of lr 1
    for stage in (3, 2):
        ds_model = copy.deepcopy(base)
        install_ulysses_attention(ds_model, sp_group, micro_batch, core=reference_varlen_core)
        before = {n: p.detach().clone() for n, p in ds_model.named_parameters()}
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch * world_size // SP_DEGREE,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "sequence_parallel_size": SP_DEGREE,
            "steps_per_print": 10**9,
        }
        module = _LMWithChunkedLoss(ds_model, CHUNK_TOKENS)
        engine, *_ = deepspeed.initialize(
            model=module, optimizer=torch.optim.SGD(module.parameters(), lr=1.0), config=config, mpu=mpu
        )
        loss_sum, count = engine(shard["input_ids"], shard["position_ids"], shard["shift_labels"])
        loss, loss_value = sp_mean_loss(loss_sum, count, sp_group, engine_sp_grad_scale(engine, SP_DEGREE))
        engine.backward(loss)
        engine.step()
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            after = {n: p.detach().clone() for n, p in engine.module.hf.named_parameters()}
        result[f"zero{stage}_loss"] = loss_value.detach()
        result[f"zero{stage}_steps"] = {n: before[n] - after[n] for n in before}
        engine.destroy()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_sp2_equals_documents_one_by_one(tmp_path):
    import torch.multiprocessing as mp

    world_size = 2
    mp.spawn(_sp_worker, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for rank, res in enumerate(results):
        assert res["local_tokens"] == 23  # 45 tokens padded to 46, halved: each rank holds half
        ref_loss, ref_grads = res["ref_loss"], res["ref_grads"]
        torch.testing.assert_close(res["sp_loss"], ref_loss, **TOL, msg=f"rank {rank}: sp loss")
        for stage in (3, 2):
            torch.testing.assert_close(res[f"zero{stage}_loss"], ref_loss, **TOL, msg=f"rank {rank}: ZeRO-{stage} loss")
        for name, expected in ref_grads.items():
            torch.testing.assert_close(res["sp_grads"][name], expected, **TOL, msg=f"rank {rank}: grad of {name}")
            for stage in (3, 2):
                torch.testing.assert_close(
                    res[f"zero{stage}_steps"][name], expected, **TOL,
                    msg=f"rank {rank}: ZeRO-{stage} SGD step of {name}",
                )
