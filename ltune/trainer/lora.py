"""LoRA adapters on the trainer's model, through peft.

`apply_adapters(lm, plan)` puts a peft LoRA layer (lora_A r x in, lora_B out x r, no bias;
peft `LoraLayer.update_layer`) around each target linear layer of every decoder layer, in place
(`peft.inject_adapter_in_model`: the module tree keeps its names, each target's weight moves
to `<name>.base_layer.weight`), and freezes every other parameter. The adapters take the base
weight's dtype (peft `_move_adapter_to_device_of_base_layer`), so the inputs are not cast in
the forward and DeepSpeed keeps their fp32 master copy like any trainable parameter. They are
drawn from a generator seeded the same on every rank, so that every rank starts from the same
adapters under any ZeRO stage. Under ZeRO-3 they are made after the partitioned build (outside
``zero.Init``); ``deepspeed.initialize`` partitions them (DeepSpeedZeRoOffload
``_convert_to_zero_parameters``: rank 0's values broadcast, then partitioned).

QLoRA (``quantize_linears``, CUDA only, ZeRO 0-2): before the adapters, every linear layer of
each decoder layer becomes a bitsandbytes ``Linear4bit`` whose weight is quantized on the device
(``Params4bit(...).to(device)`` quantizes, bitsandbytes' documented path), with the plan's
quant_type, double quantization (``compress_statistics``), storage dtype and the training
precision as compute dtype; peft then wraps each one in its ``lora.Linear4bit``.

Export (``adapter_tensors``, ``merged_weight``): peft's adapter folder names each adapter
``base_model.model.<module>.lora_A.weight`` (``get_peft_model_state_dict`` drops the adapter
name, ``PeftModel`` adds the ``base_model.model.`` prefix); the merged weight is
W + B A * alpha / r (peft ``LoraLayer.scaling``, ``Linear.get_delta_weight``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..planner.lora import target_modules
from ..planner.schema import Plan

#: added to training.seed for the adapters' initial draw (any fixed offset: the same on every rank)
ADAPTER_SEED_OFFSET = 1


#: peft's default adapter name (the `.default.` in the trainer's parameter names)
ADAPTER_NAME = "default"
#: the prefix of every key of a saved peft adapter (PeftModel -> LoraModel -> the model)
PEFT_PREFIX = "base_model.model."
#: the files of a peft adapter folder (peft.utils.constants SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME)
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
#: torch dtypes of method.quant_storage
QUANT_STORAGE_DTYPES = {"uint8": torch.uint8, "bf16": torch.bfloat16}


def lora_config(plan: Plan, **extra):
    """peft's LoraConfig for the plan's method: its rank, alpha, dropout and targets."""
    from peft import LoraConfig

    method = plan.method
    return LoraConfig(
        r=method.lora_rank,
        lora_alpha=method.lora_alpha,
        lora_dropout=method.lora_dropout,
        target_modules=sorted(target_modules(plan.model.architecture, method)),
        bias="none",
        **extra,
    )


def decoder_linears(lm: nn.Module, plan: Plan) -> list[str]:
    """The module names of every decoder layer's linear layers (the profile's
    ``linear_modules`` names; never the output head): what QLoRA stores in 4 bits."""
    names = set(plan.model.architecture.linear_modules())
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    return [name for name, module in lm.named_modules()
            if type(module) is nn.Linear and module is not head and name.rpartition(".")[2] in names]


def quantize_linears(lm: nn.Module, plan: Plan, device: torch.device) -> nn.Module:
    """QLoRA: each decoder linear layer replaced by a bitsandbytes Linear4bit whose weight (the
    model-dtype weight already on ``device``) is quantized there, one layer at a time."""
    from .errors import TrainerInputError

    if device.type != "cuda":
        raise TrainerInputError("method qlora needs CUDA (bitsandbytes' 4-bit layers): use method lora on this machine")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TrainerInputError("method qlora needs bitsandbytes: pip install bitsandbytes") from None
    from .model import torch_dtype

    method = plan.method
    compute_dtype = torch_dtype(plan.training.precision)
    storage = QUANT_STORAGE_DTYPES[method.quant_storage]
    for name in decoder_linears(lm, plan):
        owner_name, _, attr = name.rpartition(".")
        owner = lm.get_submodule(owner_name)
        linear = getattr(owner, attr)
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
            compress_statistics=method.double_quant, quant_type=method.quant_type, quant_storage=storage,
            device="meta",
        )
        weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, compress_statistics=method.double_quant,
            quant_type=method.quant_type, quant_storage=storage,
        )
        q.weight = weight.to(device)  # quantized here (Params4bit.to on CUDA, not yet quantized)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        setattr(owner, attr, q)
        del linear, weight
    lm.is_loaded_in_4bit = True  # peft's dispatch wraps Linear4bit only on a model that says so
    # Linear4bit's state dict adds each weight's quantization state (absmax, quant_map, ...) under
    # keys that are not parameters, so exclude_frozen_parameters keeps them: the checkpoint keeps
    # the adapters only (the 4-bit base is quantized again from the plan's model on resume)
    lm.register_state_dict_post_hook(_adapters_only)
    return lm


def _adapters_only(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post hook: drop every key of `module` that is not an adapter's."""
    for key in [k for k in state_dict if k.startswith(prefix) and not is_adapter(k)]:
        del state_dict[key]


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


def peft_key(name: str) -> str:
    """The key of a trainer adapter parameter (`model.layers.0.self_attn.q_proj.lora_A.default.weight`)
    in a saved peft adapter (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    return PEFT_PREFIX + name.replace(f".{ADAPTER_NAME}.", ".")


def adapter_tensors(lm: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The adapters, as (peft key, parameter), in module order."""
    return [(peft_key(name), p) for name, p in lm.named_parameters() if is_adapter(name)]


def scaling(plan: Plan) -> float:
    """What the adapter's output is multiplied by: alpha / r (peft LoraLayer.update_layer, no rslora)."""
    return plan.method.lora_alpha / plan.method.lora_rank


def merged_weight(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + B A * alpha / r (peft Linear.get_delta_weight), computed in fp32 and cast to W's dtype."""
    delta = (lora_b.float() @ lora_a.float()) * scale
    return (base.float() + delta).to(base.dtype)


def dequantized(weight) -> torch.Tensor:
    """A bitsandbytes Params4bit weight in its compute dtype (bitsandbytes functional.dequantize_4bit);
    any other tensor as it is."""
    if getattr(weight, "quant_state", None) is None:
        return weight
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
