"""LoRA adapters on the trainer's model, through peft.

`apply_adapters(lm, plan)` puts a peft LoRA layer (lora_A r x in, lora_B out x r, no bias;
peft `LoraLayer.update_layer`) around each target linear layer of every decoder layer, in place
(`peft.inject_adapter_in_model`: the module tree keeps its names, each target's weight moves
to `<name>.base_layer.weight`), and freezes every other parameter. The adapters take the base
weight's dtype (peft `_move_adapter_to_device_of_base_layer`), so the inputs are not cast in
the forward and DeepSpeed keeps their fp32 master copy like any trainable parameter. They are
drawn from a generator seeded the same on every rank, so that every rank starts from the same
adapters under any ZeRO stage.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..planner.lora import target_modules
from ..planner.schema import Plan

#: added to training.seed for the adapters' initial draw (any fixed offset: the same on every rank)
ADAPTER_SEED_OFFSET = 1


def lora_config(plan: Plan):
    """peft's LoraConfig for the plan's method: its rank, alpha, dropout and targets."""
    from peft import LoraConfig

    method = plan.method
    return LoraConfig(
        r=method.lora_rank,
        lora_alpha=method.lora_alpha,
        lora_dropout=method.lora_dropout,
        target_modules=sorted(target_modules(plan.model.architecture, method)),
        bias="none",
    )


def apply_adapters(lm: nn.Module, plan: Plan) -> nn.Module:
    """Adapters on `lm`'s target linear layers, everything else frozen (no-op for full fine-tuning)."""
    if not plan.method.adapters:
        return lm
    from peft import inject_adapter_in_model

    state = torch.random.get_rng_state()
    torch.manual_seed(plan.training.seed + ADAPTER_SEED_OFFSET)
    try:
        lm = inject_adapter_in_model(lora_config(plan), lm)
    finally:
        torch.random.set_rng_state(state)
    for name, param in lm.named_parameters():
        param.requires_grad_(".lora_" in name)
    return lm


def is_adapter(name: str) -> bool:
    """A parameter or state-dict key of an adapter (peft names them `...lora_A.default.weight`)."""
    return ".lora_A." in name or ".lora_B." in name
