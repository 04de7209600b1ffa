"""The causal-LM loss on packed sequences: a sum and a token count.

Labels here are *targets*, already shifted per document (``shift_labels``): target[t] is
the token at t+1 when t+1 belongs to the same document and carries loss, else -100. The
last token of a document never predicts the first token of the next. Shifting before
the loss (not inside it) lets a sequence-parallel rank hold a shard of the targets.

``causal_lm_loss`` returns (loss_sum, num_tokens) so that the trainer can divide by the
real tokens of the whole global batch, whatever the micro-batching, dp or sp degree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..job.constants import IGNORE_INDEX
from .chunked_loss import chunked_cross_entropy


def shift_labels(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) labels -> targets shifted left by one within each document."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    # where the next position starts a document, the current token predicts nothing
    next_starts = position_ids[:, 1:] == 0
    targets[:, :-1] = targets[:, :-1].masked_fill(next_starts, IGNORE_INDEX)
    return targets


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    mode: str = "full",
    chunk_tokens: int = 4096,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 sum of token losses, number of target tokens) for shifted ``labels``.

    mode "full": logits in the model dtype, then ``.float()``, then cross entropy (what
    transformers' ForCausalLMLoss does; holds seq x vocab logits in both dtypes).
    mode "chunked": ``ltune.trainer.chunked_loss.chunked_cross_entropy``, which
    recomputes the logits chunk by chunk and never holds them all.
    softcap c (gemma2's final_logit_softcapping): logits become c * tanh(logits / c) before
    the cross entropy, as Gemma2ForCausalLM.forward does; here on the fp32 logits (transformers
    caps in the model dtype, then upcasts: the same in fp32). In "full" mode autograd keeps the
    fp32 tanh output beside cross entropy's saved log-softmax: one more N x V fp32 tensor.
    """
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = labels.reshape(-1)
    num_tokens = (targets != IGNORE_INDEX).sum()
    if mode == "full":
        logits = F.linear(hidden, lm_head_weight).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    elif mode == "chunked":
        loss_sum = chunked_cross_entropy(hidden, lm_head_weight, targets, chunk_tokens, softcap)
    else:
        raise ValueError(f"loss mode {mode!r} is not 'full' or 'chunked'")
    return loss_sum, num_tokens


def load_balancing_loss(
    router_logits: list[torch.Tensor], expert_index: list[torch.Tensor], mask: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Switch Transformer load-balancing loss, fp32 (layers, experts) counts of the tokens routed
    to each expert) over the tokens where ``mask`` is True.

    The loss of transformers' ``load_balancing_loss_func`` (modeling_mixtral.py; Fedus et al. 2021,
    arXiv 2101.03961, eqs. 4-6) with an attention mask: E x sum_e f_e P_e, f_e the top-k
    assignments to expert e and P_e the summed softmax probability of e, both summed over layers
    and divided by (layers x masked tokens). f comes from the experts each router chose
    (``expert_index``, (tokens, k) per layer), which for softmax top-k routers (mixtral, qwen2_moe,
    qwen3_moe) is the top-k transformers takes again from the logits; the softmax is in fp32
    (transformers takes it in the logits' dtype). DeepSeek-V2/V3 (transformers computes no aux loss
    for them): the same loss, P from the softmax of their router logits (V3 routes by sigmoid plus
    a correction bias; f counts the experts it really chose). With no masked token the loss is 0.

    How the trainer combines it (``TrainModel``): ``mask`` is the micro batch's target tokens
    (labels != -100, so padding and each document's last token are out, as for the LM loss),
    across all documents of the packed rows (routing is per token: packing does not matter); under
    sequence parallelism each rank's shard of the sequence; the term coef x num_tokens x loss is
    added to the micro batch's loss sum, so after the division by the global batch's target tokens
    the aux loss is averaged over micro batches (gradient accumulation) and ranks (dp and sp)
    weighted by their tokens, like the LM loss. Traceable on fake tensors (no host sync).
    """
    weights = mask.reshape(-1).to(torch.float32)
    num_layers = len(router_logits)
    device = weights.device
    counts = []
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    for logits, index in zip(router_logits, expert_index):
        top_k = index.shape[-1]
        probs = torch.softmax(logits.reshape(-1, num_experts).to(torch.float32), dim=-1)
        prob_sum = prob_sum + (probs * weights.unsqueeze(1)).sum(dim=0)
        layer_counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
        counts.append(layer_counts.scatter_add(0, index.reshape(-1).long(), weights.repeat_interleave(top_k)))
    expert_tokens = torch.stack(counts) if counts else torch.zeros(0, num_experts, device=device)
    rows = (weights.sum() * num_layers).clamp_min(1.0)
    tokens_per_expert = expert_tokens.sum(dim=0) / rows
    prob_per_expert = prob_sum / rows
    return num_experts * (tokens_per_expert * prob_per_expert).sum(), expert_tokens.detach()
