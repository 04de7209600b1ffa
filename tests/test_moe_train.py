"""Mixture-of-experts models in the trainer: the load-balancing loss, MLA attention, ZeRO-3 runs.

CPU parts (no processes):
- the aux loss (``loss.load_balancing_loss``) equals transformers' own ``load_balancing_loss_func``
  as MixtralForCausalLM / Qwen2Moe / Qwen3MoeForCausalLM return it (``aux_loss``), and over masked
  tokens equals it over the kept tokens alone; TrainModel's objective is the LM loss sum plus
  coef x target tokens x aux (coefficient 0: the LM loss sum bit for bit);
- every family (mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3) builds through
  ``build_model`` with the varlen attention, runs forward and backward, counts k routed tokens
  per target token per MoE layer, and under ZeRO-3 marks its sparse block a DeepSpeed leaf module;
- MLA's head sizes (q/k 24, v 16) through the varlen core against attention by hand, on the SDPA
  path and on the pad-and-cut path of the flash kernels (the kernel replaced by SDPA on CPU).

Runs (marked distributed, 2 CPU processes each, gloo):
- one ``ltune launch`` of a tiny qwen3_moe (ZeRO-3, Ulysses sp 2, chunked loss, 2 rows a micro
  batch), then its resume from the middle checkpoint: the loss falls, each step logs aux_loss and
  the router statistics (k x layers x target tokens routed in all), the resumed steps log the same
  losses, aux losses and routing bit for bit;
- one direct 2-process run of a tiny deepseek_v2 (MLA, ZeRO-3, sp 2) whose rank 1 never routes a
  token to expert 3 (its router patched): it finishes within a timeout (a hang fails the test),
  rank 0 did use expert 3; and, in the same process group, the Ulysses exchange of MLA's q/k and
  v heads (their own sizes) gives the full sequence's attention.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _launch import REPO, env, launch, read_metrics, tiny_plan_dict, write_plan
from conftest import free_port

NUM_EXPERTS, TOP_K = 4, 2
AUX_COEF = 0.02
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]
#: MLA head sizes of the tiny deepseek shapes: q/k nope 16 + rope 8, v 16
MLA = dict(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)


def moe_plan_dict(family: str, **sections) -> dict:
    """The tests' tiny plan (hidden 64, 2 layers, 4 heads) as a MoE family: 4 experts, top-2."""
    plan = tiny_plan_dict(**sections)
    arch = plan["model"]["architecture"]
    arch.update(family=family, generic=False, num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
                moe_intermediate_size=64, router_aux_loss_coef=AUX_COEF)
    if family == "qwen3_moe":
        arch.update(qk_norm=True)
    if family == "qwen2_moe":
        arch.update(num_shared_experts=1, shared_expert_intermediate_size=64)
    if family.startswith("deepseek"):
        arch.update(num_kv_heads=arch["num_attention_heads"], num_shared_experts=1, dense_layers=[0], **MLA)
    if family == "deepseek_v3":
        arch.update(router_scoring="sigmoid")
    plan["training"].update(precision="fp32")
    return plan


def _plan(plan_dict: dict):
    from ltune.planner.schema import Plan

    return Plan.model_validate(plan_dict)


def _packed_inputs(seq: int = 64, docs=(40, 24)):
    """One packed row of two documents: ids, positions, shifted targets, cu_seqlens."""
    from ltune.trainer.attention import cu_seqlens_from_position_ids
    from ltune.trainer.loss import shift_labels

    ids = torch.randint(0, 512, (1, seq), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(n) for n in docs]).unsqueeze(0)
    targets = shift_labels(ids.clone(), pos)
    cu, max_len = cu_seqlens_from_position_ids(pos)
    return ids, pos, targets, cu, max_len


def _tail(result) -> str:
    return (result.stdout + result.stderr)[-3000:]


# ---------------------------------------------------------------- CPU parts


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_aux_loss_is_transformers_load_balancing_loss(family):
    """transformers' CausalLM computes the Switch loss from the logits it recorded; ours from the
    logits and the top-k our hooks recorded: equal over all tokens; over masked tokens equal to
    transformers' over the kept rows alone; the objective adds coef x tokens x aux."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from ltune.trainer.loss import load_balancing_loss
    from ltune.trainer.model import build_model

    plan = _plan(moe_plan_dict(family, layout={"num_gpus": 1, "zero_stage": 0, "recompute": "none"}))
    model = build_model(plan)
    ids, pos, targets, cu, max_len = _packed_inputs()
    loss_sum, num_tokens = model(ids, pos, targets, cu, max_len)
    stats = model.router_stats
    with torch.no_grad():
        out = model.lm(input_ids=ids, position_ids=pos, output_router_logits=True)
    logits = [layer.detach() for layer in out.router_logits]
    assert len(logits) == 2 and logits[0].shape == (64, NUM_EXPERTS)
    top_k = [torch.topk(layer, TOP_K, dim=-1).indices for layer in logits]
    everything = torch.ones(64, dtype=torch.bool)
    mine, counts = load_balancing_loss(logits, top_k, everything, NUM_EXPERTS)
    assert mine.item() == pytest.approx(out.aux_loss.item(), rel=1e-6)
    assert counts.sum().item() == 2 * 64 * TOP_K
    # masked: the same as transformers' loss over the kept tokens only
    keep = targets.reshape(-1) != -100
    masked, _ = load_balancing_loss(logits, top_k, keep, NUM_EXPERTS)
    expected = load_balancing_loss_func(tuple(layer[keep] for layer in logits), NUM_EXPERTS, TOP_K)
    assert masked.item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(masked.item() - mine.item()) > 1e-5  # the mask matters here
    # TrainModel: its recorded routing gives that masked loss; the objective adds it weighted
    assert stats.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert int(num_tokens) == int(keep.sum()) == 62
    assert loss_sum.item() == pytest.approx(stats.lm_loss_sum.item() + AUX_COEF * 62 * stats.aux_loss.item(), rel=1e-6)
    assert loss_sum.item() - stats.lm_loss_sum.item() > 1.0  # 0.02 x 62 x ~2
    # coefficient 0: the LM loss sum itself
    model.aux_loss_coef = 0.0
    loss0, _ = model(ids, pos, targets, cu, max_len)
    assert loss0.item() == model.router_stats.lm_loss_sum.item()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_and_routes(family):
    from deepspeed.utils import z3_leaf_module

    from ltune.trainer.model import MOE_BLOCK_CLASSES, build_model

    plan = _plan(moe_plan_dict(family, layout={"num_gpus": 1, "zero_stage": 0}))
    model = build_model(plan)
    assert model.lm.config._experts_implementation == "grouped_mm"
    ids, pos, targets, cu, max_len = _packed_inputs()
    loss_sum, num_tokens = model(ids, pos, targets, cu, max_len)
    loss_sum.backward()
    stats = model.router_stats
    moe_layers = 1 if family.startswith("deepseek") else 2  # deepseek: layer 0 dense
    assert stats.expert_tokens.shape == (moe_layers, NUM_EXPERTS)
    assert stats.expert_tokens.sum(dim=1).tolist() == [TOP_K * int(num_tokens)] * moe_layers
    router = next(m for m in model.lm.modules() if type(m).__name__ == MOE_BLOCK_CLASSES[family]).gate
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    blocks = [m for m in model.lm.modules() if type(m).__name__ == MOE_BLOCK_CLASSES[family]]
    assert len(blocks) == moe_layers and not any(z3_leaf_module(b) for b in blocks)
    zero3 = build_model(_plan(moe_plan_dict(family, layout={"num_gpus": 1, "zero_stage": 3})))
    blocks = [m for m in zero3.lm.modules() if type(m).__name__ == MOE_BLOCK_CLASSES[family]]
    assert len(blocks) == moe_layers and all(z3_leaf_module(b) for b in blocks)


def _attention_by_hand(q, k, v, cu, scale):
    """Causal softmax(q k^T scale) v per document, in float64."""
    outs = []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (t[start:end].transpose(0, 1).double() for t in (q, k, v))
        scores = qd @ kd.transpose(1, 2) * scale
        n = end - start
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append((scores.softmax(-1) @ vd).transpose(0, 1))
    return torch.cat(outs).float()


def test_mla_head_sizes_through_the_varlen_core(monkeypatch):
    from ltune.trainer import attention

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(30, 4, 24, generator=g), torch.randn(30, 4, 24, generator=g)
    v = torch.randn(30, 4, 16, generator=g)
    cu = torch.tensor([0, 11, 30], dtype=torch.int32)
    expected = _attention_by_hand(q, k, v, cu, 24**-0.5)
    out = attention.varlen_attention(q, k, v, cu, 19, scale=24**-0.5)  # SDPA per document (CPU)
    assert out.shape == (30, 4, 16)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the flash kernels' path: v zero-padded to 24, the output cut to 16 (the kernel: SDPA here)
    seen = []

    def fake_flash(q, k, v, cu_seqlens, max_seqlen, causal, scale, sliding_window=None, softcap=None):
        seen.append(v.shape[-1])
        return attention._sdpa_per_document(q, k, v, cu_seqlens, causal, scale, sliding_window)

    monkeypatch.setattr(attention, "resolve_backend", lambda device, dtype=None: "flash_attn")
    monkeypatch.setattr(attention, "_flash_attn", fake_flash)
    out = attention.varlen_attention(q, k, v, cu, 19, scale=24**-0.5)
    assert seen == [24] and out.shape == (30, 4, 16)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the transformers glue: (batch, heads, seq, dim) in, (batch, seq, heads, v dim) out
    out, _ = attention.hf_varlen_attention(
        None, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None,
        scaling=24**-0.5, cu_seq_lens_q=cu, max_length_q=19,
    )
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- runs


@pytest.mark.distributed
def test_moe_zero3_sp2_chunked_run_logs_routing_and_resumes_exactly(tmp_path):
    plan = moe_plan_dict("qwen3_moe", layout={"zero_stage": 3, "sp_degree": 2, "micro_batch_size": 2,
                                              "loss": "chunked"},
                         training={"max_steps": 8, "checkpoint_every": 4, "loss_chunk_tokens": 64,
                                   "learning_rate": 0.01})
    plan_file = write_plan(tmp_path / "plan.yaml", plan)
    run_dir = tmp_path / "run"
    first = launch(plan_file, run_dir, tmp_path / "cache")
    assert first.returncode == 0, _tail(first)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    losses = [m["loss"] for m in metrics]
    assert losses[-1] < losses[0] - 0.3, losses
    for m in metrics:
        # top-2 of 4 experts, 2 MoE layers: every target token counted twice per layer
        assert sum(m["expert_tokens"]) == TOP_K * 2 * m["loss_tokens"], m
        assert len(m["expert_share_min"]) == len(m["expert_share_max"]) == 2
        assert all(0 <= lo <= 1 / NUM_EXPERTS <= hi <= 1 for lo, hi in zip(m["expert_share_min"], m["expert_share_max"]))
        # the Switch loss is at least top_k (balanced routing) for softmax top-k routers, and finite
        assert TOP_K - 1e-6 <= m["aux_loss"] < NUM_EXPERTS * TOP_K, m
    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts / "step_8")
    resumed = launch(plan_file, run_dir, tmp_path / "cache", "--resume")
    assert resumed.returncode == 0, _tail(resumed)
    assert "resume: continuing after step 4" in resumed.stdout + resumed.stderr
    again = read_metrics(run_dir)
    keys = ("loss", "grad_norm", "aux_loss", "expert_tokens", "expert_share_min", "expert_share_max")
    assert [[m[k] for k in keys] for m in again] == [[m[k] for k in keys] for m in metrics]


#: the run of the direct 2-process test: finished well within this, or it hangs
HANG_TIMEOUT_S = 240
NEVER_ON_RANK_1 = 3


def _skewed_router_worker(run_dir: str) -> None:
    """One rank of the direct run (started by the test with RANK, WORLD_SIZE, ...): rank 1's
    router never picks expert 3 (its score zeroed before the top-k); the trainer runs the plan,
    then the Ulysses MLA exchange is checked in the same process group."""
    import deepspeed.comm as dist
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as ds2

    from ltune.trainer.loop import Trainer

    rank = int(os.environ["RANK"])
    picked = torch.zeros(NUM_EXPERTS, dtype=torch.long)
    original = ds2.DeepseekV2TopkRouter.forward

    def forward(self, hidden_states):
        logits, weights, index = original(self, hidden_states)
        if rank == 1:
            scores = logits.softmax(dim=-1, dtype=torch.float32)
            scores = scores.masked_fill(torch.arange(scores.shape[-1]) == NEVER_ON_RANK_1, 0.0)
            weights, index = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
            weights = weights * self.routed_scaling_factor
        picked.add_(torch.bincount(index.reshape(-1), minlength=NUM_EXPERTS))
        return logits, weights, index

    ds2.DeepseekV2TopkRouter.forward = forward
    trainer = Trainer(run_dir)
    code = trainer.train()

    # Ulysses with MLA's head sizes: each rank's token shard in, its shard of the full attention out
    from ltune.trainer.attention import hf_varlen_attention
    from ltune.trainer.sequence_parallel import install_ulysses_attention

    g = torch.Generator().manual_seed(0)
    heads, seq = 4, 30
    q, k = torch.randn(1, heads, seq, 24, generator=g), torch.randn(1, heads, seq, 24, generator=g)
    v = torch.randn(1, heads, seq, 16, generator=g)
    cu = torch.tensor([0, 11, seq], dtype=torch.int32)
    position_ids = torch.cat([torch.arange(11), torch.arange(seq - 11)]).unsqueeze(0)
    full, _ = hf_varlen_attention(None, q, k, v, None, scaling=0.2, cu_seq_lens_q=cu, max_length_q=19)
    lm = trainer.engine.module.lm
    install_ulysses_attention(lm, trainer.mpu.get_sequence_parallel_group(), 1)
    ulysses = lm._ltune_ulysses
    part = slice(rank * seq // 2, (rank + 1) * seq // 2)
    out, _ = ulysses(None, q[:, :, part], k[:, :, part], v[:, :, part], None, scaling=0.2,
                     position_ids=position_ids[:, part], cu_seq_lens_q=cu, max_length_q=19)
    exact = torch.allclose(out, full[:, part].reshape(1, seq // 2, heads * 16), atol=1e-5)
    Path(run_dir, f"rank{rank}.json").write_text(json.dumps(
        {"exit": code, "picked": picked.tolist(), "ulysses_mla_exact": bool(exact), "ulysses": type(ulysses).__name__}
    ))
    dist.barrier()


@pytest.mark.distributed
def test_rank_whose_tokens_skip_an_expert_does_not_hang(tmp_path):
    plan = moe_plan_dict("deepseek_v2", layout={"zero_stage": 3, "sp_degree": 2, "loss": "chunked"},
                         training={"max_steps": 4, "loss_chunk_tokens": 64, "learning_rate": 0.01})
    run_dir = tmp_path / "run"
    write_plan(run_dir / "plan.yaml", plan)
    port = str(free_port())
    procs = []
    for rank in range(2):
        e = env(tmp_path / "cache") | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                       "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        code = f"import sys; sys.path.insert(0, 'tests'); import test_moe_train as t; t._skewed_router_worker({str(run_dir)!r})"
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=e, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=HANG_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the 2-process run did not finish in {HANG_TIMEOUT_S} s (a hang)")
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["exit"] for r in ranks] == [0, 0]
    assert ranks[1]["picked"][NEVER_ON_RANK_1] == 0 and ranks[0]["picked"][NEVER_ON_RANK_1] > 0, ranks
    assert all(r["ulysses_mla_exact"] and r["ulysses"] == "UlyssesOwnHeadSizes" for r in ranks), ranks
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(sum(m["expert_tokens"]) == TOP_K * 1 * m["loss_tokens"] for m in metrics)  # 1 MoE layer
    assert metrics[-1]["loss"] < metrics[0]["loss"], [m["loss"] for m in metrics]
