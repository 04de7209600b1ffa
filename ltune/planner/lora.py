"""Adapter fine-tuning's counts: which linear layers carry adapters, how many parameters train,
how many frozen weights are stored in 4 bits and what those take. Pure Python.

- LoRA (Hu et al. 2021, arXiv 2106.09685; peft `LoraLayer.update_layer`): each adapted linear
  layer W (out x in) gets lora_A (r x in) and lora_B (out x r), no bias; every other parameter
  is frozen.
- QLoRA (Dettmers et al. 2023, arXiv 2305.14314; bitsandbytes `functional.quantize_4bit`):
  every linear layer of the decoder is stored in 4 bits, two values per byte, with one fp32
  absmax per block of 64 values; double quantization stores those absmax in 8 bits with one fp32
  constant per 256 of them (8/64 + 32/(64*256) = 0.127 bits per weight instead of 0.5, the
  paper's section 3). The output head stays in the compute dtype (transformers
  `get_keys_to_not_convert` keeps it out), as do the embedding, norms and biases.
"""

from __future__ import annotations

from ..profiles.schema import ModelProfile
from .schema import Method

#: values per absmax block of bitsandbytes' 4-bit quantization (quantize_4bit's blocksize)
QUANT_BLOCK = 64
#: absmax values per block of the nested 8-bit quantization (double quantization)
NESTED_QUANT_BLOCK = 256
FP32 = 4


def target_modules(model: ModelProfile, method: Method) -> dict[str, tuple[int, int]]:
    """The adapted linear layers of one decoder layer, (in_features, out_features) by name; every
    linear layer when method.lora_targets is unset. ValueError naming a target the model lacks."""
    linear = model.linear_modules()
    if method.lora_targets is None:
        return linear
    for name in method.lora_targets:
        if name not in linear:
            raise ValueError(
                f"lora_targets: {name!r} is not a linear layer of {model.name}'s decoder layers "
                f"(they are {', '.join(linear)})"
            )
    return {name: linear[name] for name in linear if name in method.lora_targets}


def adapter_params_per_layer(model: ModelProfile, method: Method) -> int:
    """One decoder layer's adapter parameters: r x (in + out) per adapted linear layer (peft lora_A, lora_B)."""
    if not method.adapters:
        return 0
    r = method.lora_rank
    return sum(r * (fan_in + fan_out) for fan_in, fan_out in target_modules(model, method).values())


def trainable_params(model: ModelProfile, method: Method) -> int:
    """Parameters the optimizer updates: all of them (full), the adapters only (lora, qlora)."""
    if not method.adapters:
        return model.num_params()
    return model.num_layers * adapter_params_per_layer(model, method)


def quantized_tensors_per_layer(model: ModelProfile, method: Method) -> list[int]:
    """Elements of each weight one decoder layer stores in 4 bits: every linear layer's under QLoRA."""
    if method.kind != "qlora":
        return []
    return [fan_in * fan_out for fan_in, fan_out in model.linear_modules().values()]


def quantized_params(model: ModelProfile, method: Method) -> int:
    """Base weights stored in 4 bits (QLoRA), all layers."""
    return model.num_layers * sum(quantized_tensors_per_layer(model, method))


def quantized_tensor_bytes(numel: int, double_quant: bool) -> int:
    """One 4-bit weight as bitsandbytes stores it: the packed values (two per byte) and its
    quantization constants, one fp32 absmax per 64 values, or with double quantization one byte
    per 64 values and one fp32 per 256 blocks (bitsandbytes `quantize_4bit`, `quantize_blockwise`)."""
    blocks = -(-numel // QUANT_BLOCK)
    constants = blocks + FP32 * -(-blocks // NESTED_QUANT_BLOCK) if double_quant else FP32 * blocks
    return -(-numel // 2) + constants


def quantized_bytes(model: ModelProfile, method: Method) -> int:
    """All 4-bit weights of the model with their constants (QLoRA); 0 otherwise."""
    per_layer = sum(quantized_tensor_bytes(n, method.double_quant) for n in quantized_tensors_per_layer(model, method))
    return model.num_layers * per_layer
