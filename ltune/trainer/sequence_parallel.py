"""Ulysses sequence parallelism for packed, variable-length batches, on DeepSpeed's implementation.

What DeepSpeed provides and we use as is (deepspeed 0.19.8):
- the process groups: `deepspeed.runtime.sequence_parallel.parallel_state_sp` (an mpu object:
  sequence-parallel groups of contiguous ranks, and one sequence-data-parallel group of all ranks,
  over which ZeRO shards and gradients are reduced once the mpu is given to `deepspeed.initialize`);
- the attention exchange: `UlyssesSPAttentionHF` (deepspeed/runtime/sequence_parallel/ulysses_sp.py,
  the Arctic Long Sequence Training port of Megatron-DeepSpeed's `DistributedAttention`): an
  all-to-all turns q, k, v from (local tokens, all heads) into (all tokens, heads / sp), it calls a
  core attention function on the full sequence, and a second all-to-all turns the output back.
  It also all-gathers `position_ids`, so the core sees the positions of the whole sequence.

What we add, because the DeepSpeed pieces assume something else:
- the core is ltune's varlen attention (`ltune.trainer.attention.varlen_attention`) on cu_seqlens
  of the *full* packed sequence, so documents never attend to each other, including across the
  shards of one sequence (DeepSpeed's registration with an `sdpa` core masks the whole pack
  causally, and its data-loader adapter shifts labels across document boundaries);
- the batch is sharded locally: every rank of a sequence-parallel group reads the same packed
  sequence (its data-parallel rank is `rank // sp_degree`) and keeps its slice, so no batch is
  exchanged (`UlyssesSPDataLoaderAdapter` instead all-gathers the groups' different batches and
  runs them one after the other, which changes how many sequences one step sees). The labels are
  shifted before slicing (a shard's last token predicts the next shard's first), padded to a
  multiple of sp_degree with -100;
- the loss: each rank sums the cross-entropy of its own tokens (`shard_batch` gives it its
  shifted targets), and the trainer divides by the real tokens of the whole global batch, times
  what DeepSpeed divides the gradients by (`deepspeed_grad_divisor`). DeepSpeed's reduction under
  sequence parallelism is not uniform across ZeRO stages (see `deepspeed_sp_grad_scale`); the
  divisor corrects for it, and the distributed test checks the update the trainer's own
  `train_step` applies under ZeRO-2 and ZeRO-3. The mpu must be given to `deepspeed.initialize`: measured at sp 2 with
  `sequence_parallel_size` in the config but no mpu, ZeRO-1/2 applied twice the gradient and
  reported twice its norm (ZeRO-3 was right); with the mpu all three were exact.

Memory (what sequence parallelism divides): every per-token activation (layer inputs kept by
checkpointing, the recomputed layer's working set, the logits or chunked-loss terms, the final norm)
is held for seq_len / sp_degree tokens per rank; inside attention each rank holds q, k, v and the
output for the full sequence but num_heads / sp_degree heads (num_kv_heads / sp_degree, at least 1,
for k and v), i.e. the same bytes as local tokens x all heads, plus the all-to-all buffers of one
layer. MLA (deepseek_v2/v3): k and v hold one head per query head, q/k heads of nope + rope and
v heads of v_head_dim, each scattered with its own size (`_ulysses_own_head_sizes`). MoE blocks
are per token: each rank routes its own shard's tokens (the router statistics and the
load-balancing loss are over them, `loss.load_balancing_loss`). Model states are unchanged (ZeRO shards them over all num_gpus ranks either way).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..job.constants import IGNORE_INDEX

ULYSSES_ATTN_KEY = "ltune_ulysses_varlen"


# ---------------------------------------------------------------- process groups


def init_sp_groups(sp_degree: int):
    """DeepSpeed's sequence-parallel mpu (contiguous ranks), or None when sp_degree is 1.

    Pass the result as `mpu=` to `deepspeed.initialize` so ZeRO shards and reduces over all ranks.
    deepspeed.comm must be initialised first. Idempotent for one degree per process.
    """
    import deepspeed.comm as dist
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    if sp_degree == 1:
        return None
    world_size = dist.get_world_size()
    if sp_degree < 1 or world_size % sp_degree:
        raise ValueError(f"sp_degree ({sp_degree}) must divide the number of processes ({world_size})")
    if mpu._SEQUENCE_PARALLEL_GROUP is None:
        mpu.initialize_sequence_parallel(sequence_parallel_size=sp_degree)
    elif mpu.get_sequence_parallel_world_size() != sp_degree:
        raise ValueError(
            f"sequence-parallel groups already built with degree {mpu.get_sequence_parallel_world_size()}, "
            f"not {sp_degree}"
        )
    return mpu


# ---------------------------------------------------------------- batches


def pad_to_multiple(batch: dict[str, Tensor], multiple: int, pad_token_id: int = 0) -> dict[str, Tensor]:
    """Pad input_ids, position_ids and labels (B, S) on the right to a multiple of `multiple`
    tokens: padding is its own segment (positions from 0), with no loss (-100)."""
    seq = batch["input_ids"].shape[1]
    pad = -seq % multiple
    out = dict(batch)
    if pad == 0:
        return out
    rows = batch["input_ids"].shape[0]
    ids, pos, lab = batch["input_ids"], batch["position_ids"], batch["labels"]
    out["input_ids"] = torch.cat([ids, ids.new_full((rows, pad), pad_token_id)], dim=1)
    out["position_ids"] = torch.cat([pos, torch.arange(pad, device=pos.device, dtype=pos.dtype).expand(rows, pad)], dim=1)
    out["labels"] = torch.cat([lab, lab.new_full((rows, pad), IGNORE_INDEX)], dim=1)
    return out


def shard_batch(batch: dict[str, Tensor], sp_rank: int, sp_degree: int, pad_token_id: int = 0) -> dict[str, Any]:
    """This rank's slice of a packed batch {input_ids, position_ids, labels} (B, S), labels as
    read (not yet shifted).

    Pads to a multiple of sp_degree, shifts the labels per document (`loss.shift_labels`: a
    shard's last token predicts the next shard's first; a document's last token predicts
    nothing), computes cu_seqlens / max_seqlen of the whole padded batch
    (`attention.cu_seqlens_from_position_ids`), then keeps tokens
    [sp_rank * S_pad / sp, (sp_rank + 1) * S_pad / sp) of input_ids, position_ids and labels.
    cu_seqlens stays whole: after the all-to-all the attention core sees every token. With
    sp_degree 1 this is the trainer's own preparation of a micro batch.
    """
    from .attention import cu_seqlens_from_position_ids
    from .loss import shift_labels

    if not 0 <= sp_rank < sp_degree:
        raise ValueError(f"sp_rank ({sp_rank}) must be in [0, sp_degree ({sp_degree}))")
    padded = pad_to_multiple(batch, sp_degree, pad_token_id)
    targets = shift_labels(padded["labels"], padded["position_ids"])
    cu_seqlens, max_seqlen = cu_seqlens_from_position_ids(padded["position_ids"])
    local = padded["input_ids"].shape[1] // sp_degree
    window = slice(sp_rank * local, (sp_rank + 1) * local)
    return {
        "input_ids": padded["input_ids"][:, window].contiguous(),
        "position_ids": padded["position_ids"][:, window].contiguous(),
        "labels": targets[:, window].contiguous(),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": max_seqlen,
    }


# ---------------------------------------------------------------- attention


def install_ulysses_attention(model, sp_group, micro_batch_size: int, hf_attention: Callable | None = None) -> str:
    """Route every attention layer of a transformers model through DeepSpeed's
    `UlyssesSPAttentionHF` over `sp_group`, around a transformers-style attention function
    (default: the trainer's varlen one, `attention.hf_varlen_attention`).

    After the all-to-all that function sees every token of the sequence for heads / sp heads, the
    gathered position_ids, and the caller's `cu_seq_lens_q` / `max_length_q` kwargs untouched: pass
    the cu_seqlens of the whole padded sequence (`shard_batch`). Registers under a key of its own
    (other models keep their implementation) and switches the model to it; transformers builds no
    mask for an unknown key. Returns the key.
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface

    if hf_attention is None:
        from .attention import hf_varlen_attention as hf_attention
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads, ulysses_class = cfg.num_key_value_heads, UlyssesSPAttentionHF
    if getattr(cfg, "kv_lora_rank", None) is not None:
        # MLA (deepseek_v2/v3): q/k heads of nope + rope, v heads of v_head_dim, and as many k/v
        # heads as query heads (DeepseekV2Attention.expand_kv)
        head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        kv_heads, ulysses_class = cfg.num_attention_heads, _ulysses_own_head_sizes()
    ulysses = ulysses_class(
        attn=hf_attention,
        batch_size=micro_batch_size,
        attn_head_count=cfg.num_attention_heads,
        attn_head_size=head_dim,
        kv_head_count=kv_heads,
        num_hidden_layers=cfg.num_hidden_layers,
        process_group=sp_group,
        seq_length_is_variable=True,
    )

    def ulysses_attention(module, query, key, value, attention_mask, *args, **kwargs):
        # any mask transformers built is for the local shard: boundaries come from cu_seqlens
        return ulysses(module, query, key, value, None, *args, **kwargs)

    key = f"{ULYSSES_ATTN_KEY}_{id(ulysses)}"
    AttentionInterface.register(key, ulysses_attention)
    model.config._attn_implementation = key
    model._ltune_ulysses = ulysses  # keep it alive with the model
    return key


def _ulysses_own_head_sizes():
    """``UlyssesSPAttentionHF`` for q/k and v heads of different sizes (MLA), as a class.

    DeepSpeed's exchange reshapes q, k and v with one ``attn_head_size`` and requires key and value
    of one shape. This subclass scatters each tensor's heads with its own head size (the
    all-to-alls and the layout are DeepSpeed's: ``_dim_zero_all_to_all`` over dim 0 of
    [ws, sl_l, bs, hc_l, hs]) and gathers the output back with the value head size. Dense models
    keep DeepSpeed's class.
    """
    import deepspeed.comm as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from deepspeed.sequence.layer import _dim_zero_all_to_all
    from einops import rearrange

    class UlyssesOwnHeadSizes(UlyssesSPAttentionHF):
        def _scatter_heads(self, x: Tensor, local_heads: int) -> Tensor:
            """[sl_l bs hc hs] -> [sl bs hc_l hs], hs the tensor's own head size."""
            x = x.reshape(self.local_seq_length, self.batch_size, self.world_size, local_heads, x.shape[-1])
            x = rearrange(x, "sl_l bs ws hc_l hs -> ws sl_l bs hc_l hs").contiguous()
            out = _dim_zero_all_to_all(self.process_group, x)
            return out.reshape(self.global_seq_length, *out.shape[2:]).contiguous()

        def _combine_local_sequences(self, query, key, value):
            kv = []
            for t in (key, value):
                if self.kv_replication_factor > 1:
                    t = t.repeat_interleave(self.kv_replication_factor, dim=2)
                kv.append(self._scatter_heads(t, self.local_kv_head_count))
            return self._scatter_heads(query, self.local_q_head_count), kv[0], kv[1]

        def _partition_global_sequence(self, x: Tensor) -> Tensor:
            """[sl bs em_l] -> [sl_l bs em], em_l = local heads x value head size."""
            x = x.reshape(self.world_size, self.local_seq_length, self.batch_size, x.shape[-1]).contiguous()
            out = rearrange(_dim_zero_all_to_all(self.process_group, x), "ws sl_l bs em_l -> sl_l bs ws em_l")
            return out.reshape(*out.shape[:2], -1).contiguous()

        def forward(self, module, query, key, value, attention_mask, *args, **kwargs):
            # DeepSpeed's forward (seq_length_is_variable), less its one-head-size shape checks
            self.local_seq_length = query.shape[2]
            self.global_seq_length = self.local_seq_length * self.world_size
            if query.shape[1] != self.attn_head_count or not key.shape[1] == value.shape[1] == self.global_kv_head_count:
                raise ValueError(f"Ulysses: {query.shape[1]} query and {key.shape[1]}/{value.shape[1]} key/value "
                                 f"heads, expected {self.attn_head_count} and {self.global_kv_head_count}")
            if "position_ids" not in kwargs:
                raise ValueError("Ulysses sequence parallelism needs position_ids in the forward")
            query, key, value = (rearrange(t, "bs hc sl hs -> sl bs hc hs") for t in (query, key, value))
            gathered = [torch.empty_like(kwargs["position_ids"]) for _ in range(self.world_size)]
            dist.all_gather(gathered, kwargs["position_ids"], group=self.process_group)
            kwargs["position_ids"] = torch.cat(gathered, dim=1)
            layers = self._combine_local_sequences(query, key, value)
            q, k, v = (rearrange(t, "sl bs hc_l hs -> bs hc_l sl hs").contiguous() for t in layers)
            if self.kv_replication_factor > 1:
                module.num_key_value_groups = q.size(-3) // k.size(-3)
            context, weights = self.attn(module, q, k, v, attention_mask, *args, **kwargs)
            context = rearrange(context, "bs sl ... -> sl bs ...")
            output = self._partition_global_sequence(context.reshape([*context.shape[:2], -1]))
            output = rearrange(output, "sl_l bs ... -> bs sl_l ...")
            return output.reshape([*output.shape[:2], -1]), weights

    return UlyssesOwnHeadSizes


# ---------------------------------------------------------------- loss


def deepspeed_sp_grad_scale(zero_stage: int, sp_degree: int, reduce_scatter: bool = True) -> float:
    """Factor on each rank's loss that makes DeepSpeed's reduced gradient the sum over the
    sequence-parallel group averaged over the data-parallel degree (dp = world / sp).

    DeepSpeed 0.19.8 sums gradients over all ranks and divides by world_size / sp_degree in the
    engine's own all-reduce (stage 0, engine.py `_reduce_non_expert_gradients`), in ZeRO-1/2
    (stage_1_and_2.py: `div_(world_size / sequence_parallel_size)`) and in ZeRO-3's all-reduce path;
    but ZeRO-3's default reduce-scatter path (stage3.py `__avg_scatter_grads` ->
    coalesced_collectives.reduce_scatter_coalesced, which pre-divides by the group size) divides by
    world_size. There the loss must be multiplied by sp_degree. The distributed test checks both.
    """
    return float(sp_degree) if zero_stage == 3 and reduce_scatter else 1.0


def engine_sp_grad_scale(engine, sp_degree: int) -> float:
    """`deepspeed_sp_grad_scale` for a DeepSpeed engine."""
    return deepspeed_sp_grad_scale(engine.zero_optimization_stage(), sp_degree, engine.zero_reduce_scatter())


def deepspeed_grad_divisor(engine, sp_degree: int) -> float:
    """What DeepSpeed divides the all-rank sum of gradients by: world_size / sp_degree, times
    `deepspeed_sp_grad_scale` (so world_size under ZeRO-3's reduce-scatter, and always when
    sp_degree is 1). A loss of loss_sum x divisor x grad_accum / global_tokens per micro batch
    gives the gradient of the mean over all real tokens of the global batch."""
    import deepspeed.comm as dist

    return dist.get_world_size() / sp_degree * engine_sp_grad_scale(engine, sp_degree)

