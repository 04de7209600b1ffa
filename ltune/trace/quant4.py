"""A memory-exact stand-in for bitsandbytes' Linear4bit (QLoRA's frozen 4-bit linear layers), for
tracing on CPU fake tensors.

Why: bitsandbytes needs CUDA (and is not a dependency of the trace); under the trace every linear
layer of the decoder layers is replaced by `Linear4bitMemory`, which computes nothing but
allocates, saves and frees what bitsandbytes does:

- storage (bitsandbytes `functional.quantize_4bit`, `nn.Params4bit`): the packed 4-bit weight, a
  uint8 tensor of ceil(n / 2) elements, shape (ceil(n / 2), 1), frozen; its quantization constants
  (fp32 absmax per 64 values, or with double quantization a uint8 absmax per 64 values and an fp32
  one per 256 blocks) live in the weight's QuantState, not as parameters: `storage_bytes` counts them.
- forward (bitsandbytes `autograd/_functions.py` `MatMul4Bit.forward`):
  `linear(A, dequantize_4bit(B, state).to(A.dtype).t(), bias)`: the whole weight dequantized to the
  compute dtype (out x in, a transient) and the matmul; with double quantization
  `functional.dequantize_4bit` first dequantizes the absmax into a transient fp32 tensor (one value
  per 64 weights) beside the output. Only the quantized weight is kept for backward (already
  resident): the weight has no gradient, so the input is not saved.
- backward (`MatMul4Bit.backward`): `grad_A = matmul(grad_output, dequantize_4bit(B, state).t())`:
  the weight dequantized again (same transients), no weight gradient.

`Linear4bitMemory` subclasses nn.Linear, so peft's default dispatch (`lora.Linear`, peft 0.21
`tuners/lora/layer.py dispatch_default`) wraps it as it wraps bitsandbytes' own layer
(`lora.bnb.Linear4bit`, whose forward is the same: base output + lora_B(lora_A(dropout(x))) * scaling).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..planner.lora import NESTED_QUANT_BLOCK, QUANT_BLOCK

FP32_BYTES = 4


def _dequantize(layer: "Linear4bitMemory", dtype: torch.dtype, device) -> torch.Tensor:
    """bitsandbytes `functional.dequantize_4bit`: with double quantization the absmax dequantized
    to fp32 (`dequantize_blockwise`) beside the (out x in) output; the absmax freed on return."""
    absmax = torch.empty(layer.blocks, dtype=torch.float32, device=device) if layer.double_quant else None
    weight = torch.empty((layer.out_features, layer.in_features), dtype=dtype, device=device)
    del absmax
    return weight


class _MatMul4bitMemory(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, bias, layer) -> torch.Tensor:
        weight = _dequantize(layer, x.dtype, x.device)
        out = F.linear(x, weight, bias)
        del weight
        ctx.layer = layer
        ctx.save_for_backward(packed)  # resident: no new bytes
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = _dequantize(ctx.layer, grad_out.dtype, grad_out.device)
        grad_x = torch.matmul(grad_out, weight)
        del weight
        return grad_x, None, None, None


class Linear4bitMemory(nn.Linear):
    """A frozen linear layer stored in 4 bits, with bitsandbytes Linear4bit's memory (module docstring)."""

    def __init__(self, linear: nn.Linear, double_quant: bool = True):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        numel = self.in_features * self.out_features
        self.numel = numel
        self.blocks = -(-numel // QUANT_BLOCK)
        self.double_quant = double_quant
        device = linear.weight.device
        self.weight = nn.Parameter(torch.empty((-(-numel // 2), 1), dtype=torch.uint8, device=device), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def storage_bytes(self) -> int:
        """The packed weight and its QuantState constants, as bitsandbytes stores them."""
        if self.double_quant:
            constants = self.blocks + FP32_BYTES * -(-self.blocks // NESTED_QUANT_BLOCK)
        else:
            constants = FP32_BYTES * self.blocks
        return -(-self.numel // 2) + constants

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MatMul4bitMemory.apply(x, self.weight, self.bias, self)


def quantize_decoder_linears(lm: nn.Module, module_names, double_quant: bool = True) -> int:
    """Replace each linear layer of `lm` at `module_names` (trainer/lora.py `decoder_linears`: what
    the trainer stores in 4 bits) by a Linear4bitMemory, in place; return how many were replaced."""
    for name in module_names:
        owner_name, _, attr = name.rpartition(".")
        owner = lm.get_submodule(owner_name)
        setattr(owner, attr, Linear4bitMemory(getattr(owner, attr), double_quant))
    return len(module_names)
