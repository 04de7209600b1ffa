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
