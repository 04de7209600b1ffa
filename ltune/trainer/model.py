"""Building the model: a local HF folder or the plan's architecture at random init.

Under ZeRO-3 the model is built partitioned inside
``deepspeed.zero.Init(config_dict_or_path=ds_config)``; random weights are then
initialised module by module on gathered parameters, and pretrained safetensors
weights are copied straight into the partitions. ``use_cache=False`` (packed
sequences need it) and non-reentrant gradient checkpointing when recompute is "full".

``TrainModel`` is the module DeepSpeed wraps: body -> hidden states -> our loss. The
output head is called as a module (``LossHead``) so that ZeRO-3's hooks gather its
weight before the loss uses it, and the full logits are never made by transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..planner.schema import Plan
from . import attention
from .errors import TrainerInputError
from .loss import causal_lm_loss



class LossHead(nn.Linear):
    """The model's lm_head, able to return the loss instead of the logits."""

    mode = "full"
    chunk_tokens = 4096

    def forward(self, hidden_states, labels=None):
        if labels is None:
            return F.linear(hidden_states, self.weight, self.bias)
        return causal_lm_loss(hidden_states, self.weight, labels, self.mode, self.chunk_tokens)


class TrainModel(nn.Module):
    """forward(input_ids, position_ids, labels[, cu_seqlens, max_seqlen]) -> (loss_sum, num_tokens)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, labels, cu_seqlens=None, max_seqlen=None):
        kwargs = {}
        if cu_seqlens is not None:
            kwargs = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen)
        out = self.lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs)
        return self.lm.lm_head(out.last_hidden_state, labels)


def attn_implementation(plan: Plan) -> str:
    """transformers' attn_implementation for the plan's layout.attention."""
    if plan.layout.attention == "eager":
        # eager + a block-diagonal causal mask built by transformers from position_ids
        return "eager"
    return attention.register_with_transformers()


def hf_config(plan: Plan, attn_impl: str):
    from transformers import AutoConfig

    if plan.model.path:
        config = AutoConfig.from_pretrained(plan.model.path, trust_remote_code=plan.model.trust_remote_code)
    else:
        fields = dict(plan.model.architecture.to_hf_config())
        fields.pop("architectures", None)
        model_type = fields.pop("model_type")
        config = AutoConfig.for_model(model_type, **fields)
    config.use_cache = False
    config._attn_implementation = attn_impl
    return config


def torch_dtype(precision: str) -> torch.dtype:
    """The model dtype of a plan's training.precision."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision not in dtypes:
        raise ValueError(f"precision must be one of {', '.join(dtypes)} (got {precision!r})")
    return dtypes[precision]


def _checkpoint_files(folder: str) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise TrainerInputError(f"model.path: {folder} holds no *.safetensors weights")
    return files


def _load_safetensors_zero3(lm: nn.Module, folder: str) -> None:
    """Copy a safetensors checkpoint into ZeRO-3 partitions, one parameter at a time.

    Every rank reads the file headers (cheap) so that a missing weight fails everywhere
    at once; rank 0 reads the tensors and GatheredParameters(modifier_rank=0) scatters
    them into the partitions.
    """
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for file in _checkpoint_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                where[key] = file
    named = dict(lm.named_parameters())
    missing = [n for n in named if n not in where]
    if missing:
        raise TrainerInputError(f"model.path: {folder} lacks {len(missing)} weights (first: {missing[0]})")
    rank = dist.get_rank() if dist.is_initialized() else 0
    handles = {}
    try:
        with torch.no_grad():
            for name, param in named.items():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if rank == 0:
                        file = where[name]
                        if file not in handles:
                            handles[file] = safe_open(str(file), framework="pt").__enter__()
                        param.data.copy_(handles[file].get_tensor(name))
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)


def _build_zero3(plan: Plan, config, ds_config: dict) -> nn.Module:
    """Partitioned at construction (deepspeed.zero.Init), then initialised or loaded.

    The same steps transformers takes under its own ZeRO-3 switch (modeling_utils
    ``_from_config``), taken here directly because that switch needs accelerate.
    """
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers import initialization as hf_init
    from transformers.integrations.deepspeed import initialize_weights_zero3, prevent_arange_dtype_change

    with hf_init.no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        lm = AutoModelForCausalLM.from_config(config, trust_remote_code=plan.model.trust_remote_code)
    if plan.model.path:
        _load_safetensors_zero3(lm, plan.model.path)
    else:
        initialize_weights_zero3(lm)
    lm.tie_weights()
    return lm


def build_model(plan: Plan, ds_config: dict | None = None) -> TrainModel:
    """The model of the plan, ready for deepspeed.initialize (partitioned under ZeRO-3).

    Random init is seeded with training.seed (rank 0 initialises under ZeRO-3).
    """
    from transformers import AutoModelForCausalLM

    impl = attn_implementation(plan)
    config = hf_config(plan, impl)
    torch.manual_seed(plan.training.seed)
    if ds_config is not None and plan.layout.zero_stage == 3:
        lm = _build_zero3(plan, config, ds_config)
    elif plan.model.path:
        _checkpoint_files(plan.model.path)
        lm = AutoModelForCausalLM.from_pretrained(
            plan.model.path, config=config, dtype=torch_dtype(plan.training.precision),
            trust_remote_code=plan.model.trust_remote_code,
        )
    else:
        lm = AutoModelForCausalLM.from_config(config, trust_remote_code=plan.model.trust_remote_code)
    lm.config.use_cache = False
    lm.config._attn_implementation = impl
    if plan.layout.recompute == "full":
        kwargs = {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    head = lm.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(f"the output head is a {type(head).__name__}, not nn.Linear: cannot attach the loss")
    head.__class__ = LossHead
    head.mode = plan.layout.loss
    head.chunk_tokens = plan.training.loss_chunk_tokens
    lm.train()
    return TrainModel(lm)


def unwrap_state_dict(state_dict: dict) -> dict:
    """TrainModel's state dict keys ("lm.model...") as the HF model's ("model...")."""
    return {k.removeprefix("lm."): v for k, v in state_dict.items()}
