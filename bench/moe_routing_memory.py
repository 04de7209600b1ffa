"""Does a MoE layer's memory depend on the routing? A real (not fake) CPU run of one Mixtral sparse
block, forward and backward, under PyTorch's MemTracker, with the router forced to send every token
to expert 0 ("one") or to spread them round-robin over all experts ("spread"), for transformers'
"grouped_mm" experts (what ltune's trainer pins, ltune/trainer/model.py) and the "eager" loop over
the experts hit. Fake tensors (ltune trace) carry no values, so the trace cannot route: this shows
why it need not with grouped_mm. Usage: python bench/moe_routing_memory.py"""

from __future__ import annotations

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

TOKENS, HIDDEN, FFN, EXPERTS, TOP_K = 2048, 256, 512, 8, 2


def peak_activation_bytes(impl: str, routing: str) -> int:
    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg).to(torch.bfloat16)
    if routing == "one":
        idx = torch.stack([torch.zeros(TOKENS, dtype=torch.long), torch.ones(TOKENS, dtype=torch.long)], 1)
    else:
        idx = torch.stack([torch.arange(TOKENS) % EXPERTS, (torch.arange(TOKENS) + 1) % EXPERTS], 1)
    original = block.gate.forward

    def forced(h):
        logits, scores, _ = original(h)
        return logits, scores, idx  # the router's own weights, the forced experts
    block.gate.forward = forced
    x = torch.randn(1, TOKENS, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    mt = MemTracker()
    mt.track_external(block, x)
    with mt:
        block(x).float().sum().backward()
    snap = mt.get_tracker_snapshot("peak")
    dev = next(iter(snap))
    return sum(v for k, v in snap[dev].items() if str(k) in ("Activation", "Temp", "_MemRefType.ACT", "_MemRefType.TEMP")
               or getattr(k, "value", "") in ("Activation", "Temp"))


def main() -> None:
    print(f"{TOKENS} tokens, h {HIDDEN}, F {FFN}, top-{TOP_K} of {EXPERTS}; peak activation+temp bytes (MiB)")
    for impl in ("grouped_mm", "eager"):
        row = {r: peak_activation_bytes(impl, r) for r in ("one", "spread")}
        print(f"{impl:>10}: all to experts 0/1 {row['one'] / 2**20:8.2f}   spread {row['spread'] / 2**20:8.2f}")


if __name__ == "__main__":
    main()
