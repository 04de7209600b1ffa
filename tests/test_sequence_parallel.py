"""Ulysses sequence parallelism on packed documents: batch sharding, the trainer's varlen attention
behind DeepSpeed's UlyssesSPAttentionHF, the loss normalisation, and the refusal of a bad sp degree.

The distributed test starts 2 processes over gloo (one launch). A tiny llama in fp32, the trainer's
own TrainModel / LossHead (chunked loss) and attention glue, on a packed batch whose documents
straddle the shard boundary:
- sp 2 by hand (DeepSpeed's all-to-all, gradients summed over the group) against the same documents
  run one at a time through stock transformers (sdpa): loss and every parameter gradient to 1e-5;
  and a control: the same pack attended across document boundaries gives another loss;
- sp 2 through the trainer's own `Trainer.train_step` (its ranks and sp groups from
  `join_process_group`, its micro batches from `prepare_micro_batch`, its loss normalisation) on
  DeepSpeed ZeRO-3 and ZeRO-2 engines given the sequence-parallel mpu, one row per micro batch
  (gradient accumulation 2): one SGD step of lr 1 moves every parameter by exactly the reference
  gradient, the logged loss is the reference loss over the 77 real targets counted by hand, and
  the engine's grad norm is the reference norm.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from ltune.trainer.sequence_parallel import shard_batch

from conftest import free_port as _free_port, make_plan, tiny_arch

VOCAB = 96
DOC_LENGTHS = [[10, 20, 15], [7, 30, 8]]  # 45 tokens a row: padded to 46, shards of 23 split documents
SP_DEGREE = 2
CHUNK_TOKENS = 7
TOL = dict(rtol=1e-5, atol=1e-5)
# next-token targets: (document length - 1) per document, less the -100 labels that are targets
# (row 0: labels 1..3 of its first document; row 1: labels 10..13, inside its second document)
REAL_TARGETS = (9 + 19 + 14 - 3) + (6 + 29 + 7 - 4)


# ---------------------------------------------------------------- fixtures shared with the workers


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


def per_document_loss(model, batch) -> tuple[torch.Tensor, int]:
    """(summed next-token loss, count) over all real targets, each document run alone through the model."""
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
    return loss_sum, count


def train_model(hf_model, chunk_tokens: int = CHUNK_TOKENS):
    """The trainer's TrainModel around a transformers model, its output head made the trainer's
    LossHead in chunked mode (as build_model does)."""
    from ltune.trainer.model import LossHead, TrainModel

    hf_model.lm_head.__class__ = LossHead
    hf_model.lm_head.mode = "chunked"
    hf_model.lm_head.chunk_tokens = chunk_tokens
    return TrainModel(hf_model)


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- unit tests (no processes)


def test_shards_cover_the_padded_batch():
    batch = packed_batch()
    full = shard_batch(batch, 0, 1)
    assert torch.equal(full["input_ids"], batch["input_ids"])
    shards = [shard_batch(batch, r, 4) for r in range(4)]  # 45 tokens -> 48, shards of 12
    for key in ("input_ids", "position_ids", "labels"):
        assert all(s[key].shape == (2, 12) for s in shards)
    joined_labels = torch.cat([s["labels"] for s in shards], dim=1)
    assert torch.equal(joined_labels[:, :45], full["labels"])
    assert (joined_labels[:, 44:] == -100).all()  # last real token and the padding: no target
    # a document straddling shards 0 and 1: shard 0's last token predicts shard 1's first token
    assert shards[0]["labels"][0, -1] == batch["input_ids"][0, 12]
    # the last token of a document predicts nothing (document 1 of row 0 ends at token 9)
    assert full["labels"][0, 9] == -100 and full["labels"][0, 8] == batch["input_ids"][0, 9]
    assert torch.equal(torch.cat([s["position_ids"] for s in shards], dim=1)[:, 45:], torch.arange(3).expand(2, 3))
    # every shard carries the cu_seqlens of the whole padded batch: 5 documents + 2 padding segments
    assert shards[0]["cu_seqlens"].tolist() == [0, 10, 30, 45, 48, 55, 85, 93, 96]
    assert shards[0]["max_seqlen"] == 30
    assert all(torch.equal(s["cu_seqlens"], shards[0]["cu_seqlens"]) for s in shards)
    with pytest.raises(ValueError, match=r"sp_rank \(2\)"):
        shard_batch(batch, 2, 2)


def test_sp_degree_not_dividing_heads_is_refused():
    with pytest.raises(ValueError, match=r"sp_degree \(3\) must divide num_attention_heads \(4\)"):
        make_plan(arch=tiny_arch(), layout={"num_gpus": 3, "sp_degree": 3})
    with pytest.raises(ValueError, match=r"sp_degree \(4\) must divide num_gpus \(2\)"):
        make_plan(arch=tiny_arch(), layout={"num_gpus": 2, "sp_degree": 4})
    with pytest.raises(ValueError, match=r"sp_degree \(2\) must divide num_kv_heads \(3\)"):
        make_plan(arch=tiny_arch(num_attention_heads=6, num_kv_heads=3, hidden_size=96), layout={"num_gpus": 2, "sp_degree": 2})
    plan = make_plan(arch=tiny_arch(), layout={"num_gpus": 2, "sp_degree": 2})
    assert plan.layout.sp_degree == 2 and plan.layout.dp_degree == 1


# ---------------------------------------------------------------- distributed (2 processes, gloo)


def _sp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    import signal

    import deepspeed
    import deepspeed.comm as dist

    from ltune.trainer.loop import Trainer
    from ltune.trainer.sequence_parallel import install_ulysses_attention

    # the trainer's own process group, ranks and sequence-parallel groups
    rows = len(DOC_LENGTHS)
    trainer = Trainer(out_dir)
    trainer.plan = make_plan(
        arch=tiny_arch(vocab_size=VOCAB, max_position_embeddings=128),
        layout={"num_gpus": world_size, "sp_degree": SP_DEGREE, "micro_batch_size": 1},
        training={"seq_len": sum(DOC_LENGTHS[0]), "gradient_accumulation_steps": rows},
    )
    trainer.join_process_group()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # so that mp.spawn can stop a worker whose peer failed
    sp_group, sp_rank = trainer.mpu.get_sequence_parallel_group(), trainer.sp_rank
    batch = packed_batch()
    shard = shard_batch(batch, sp_rank, SP_DEGREE)
    inputs = (shard["input_ids"], shard["position_ids"], shard["labels"], shard["cu_seqlens"], shard["max_seqlen"])
    base = tiny_llama()

    # reference: every document alone through stock transformers
    reference = copy.deepcopy(base)
    ref_sum, ref_count = per_document_loss(reference, batch)
    ref_loss = ref_sum / ref_count
    ref_loss.backward()
    result = {
        "ref_loss": ref_loss.detach(), "ref_count": ref_count, "ref_grads": grads_of(reference),
        "local_tokens": shard["input_ids"].shape[1],
    }

    # sp 2 by hand: DeepSpeed's Ulysses attention around the trainer's varlen attention, the
    # trainer's chunked loss head, each rank's loss sum over the reference count, gradients
    # summed over the group
    def group_mean(loss_sum: torch.Tensor) -> torch.Tensor:
        total = loss_sum.detach().clone()
        dist.all_reduce(total, group=sp_group)
        return total / ref_count

    sp_model = copy.deepcopy(base)
    install_ulysses_attention(sp_model, sp_group, rows)
    model = train_model(sp_model)
    loss_sum, _ = model(*inputs)
    (loss_sum / ref_count).backward()
    grads = grads_of(sp_model)
    for grad in grads.values():
        dist.all_reduce(grad, group=sp_group)
    result.update(sp_loss=group_mean(loss_sum), sp_grads=grads)
    # control: the same pack with one segment per row (documents see each other) differs
    segments = torch.arange(0, 2 * rows * inputs[0].shape[1] + 1, 2 * inputs[0].shape[1], dtype=torch.int32)
    with torch.no_grad():
        result["leaky_loss"] = group_mean(model(*inputs[:3], segments, 2 * inputs[0].shape[1])[0])

    # the trainer's train_step on DeepSpeed engines given the mpu (ZeRO-3, then ZeRO-2): one row
    # per micro batch, prepared by the trainer; one SGD step of lr 1
    micro_batches = [{k: v[i : i + 1].numpy() for k, v in batch.items()} for i in range(rows)]
    for stage in (3, 2):
        ds_model = copy.deepcopy(base)
        install_ulysses_attention(ds_model, sp_group, 1)
        before = {n: p.detach().clone() for n, p in ds_model.named_parameters()}
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": rows,
            "train_batch_size": rows * world_size // SP_DEGREE,
            "gradient_clipping": 1e6,  # computes the norm, never clips
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "sequence_parallel_size": SP_DEGREE,
            "steps_per_print": 10**9,
        }
        module = train_model(ds_model)
        engine, *_ = deepspeed.initialize(
            model=module, optimizer=torch.optim.SGD(module.parameters(), lr=1.0), config=config, mpu=trainer.mpu
        )
        trainer.use_engine(engine)
        record = trainer.train_step([trainer.prepare_micro_batch(arrays) for arrays in micro_batches])
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            after = {n: p.detach().clone() for n, p in engine.module.lm.named_parameters()}
        result[f"zero{stage}_record"] = record
        result[f"zero{stage}_steps"] = {n: before[n] - after[n] for n in before}
        engine.destroy()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()


@pytest.mark.distributed
def test_sp2_equals_documents_one_by_one(tmp_path):
    import torch.multiprocessing as mp

    world_size = 2
    mp.spawn(_sp_worker, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for rank, res in enumerate(results):
        assert res["local_tokens"] == 23  # 45 tokens padded to 46, halved: each rank holds half
        assert res["ref_count"] == REAL_TARGETS == 77
        ref_loss, ref_grads = res["ref_loss"], res["ref_grads"]
        ref_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values())).item()
        torch.testing.assert_close(res["sp_loss"], ref_loss, **TOL, msg=f"rank {rank}: sp loss")
        assert abs(res["leaky_loss"].item() - ref_loss.item()) > 1e-3, "the control should see the leak"
        for name, expected in ref_grads.items():
            torch.testing.assert_close(res["sp_grads"][name], expected, **TOL, msg=f"rank {rank}: grad of {name}")
        for stage in (3, 2):
            record = res[f"zero{stage}_record"]
            assert record["loss_tokens"] == REAL_TARGETS, f"ZeRO-{stage} loss tokens"
            assert record["loss"] == pytest.approx(ref_loss.item(), rel=1e-5), f"rank {rank}: ZeRO-{stage} loss"
            assert record["grad_norm"] == pytest.approx(ref_norm, rel=1e-5), f"ZeRO-{stage} grad norm"
            assert record["step_applied"] and record["lr"] == 1.0
            for name, expected in ref_grads.items():
                torch.testing.assert_close(
                    res[f"zero{stage}_steps"][name], expected, **TOL,
                    msg=f"rank {rank}: ZeRO-{stage} SGD step of {name}",
                )
