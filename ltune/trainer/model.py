"""Building the model: a local HF folder or the plan's architecture at random init.

Under ZeRO-3 the model is built partitioned inside
``deepspeed.zero.Init(config_dict_or_path=ds_config)``; random weights are then
initialised module by module on gathered parameters, and pretrained safetensors
weights are copied straight into the partitions (tied weights are tied first, so a
checkpoint without ``lm_head.weight`` loads). Under ZeRO 0-2 the model never exists in
fp32 on the host: built on the meta device, then initialised module by module in fp32 on
the CPU (the CPU generator draws what a CPU build draws, so the weights are the ones a
plain ``from_config`` gives) and each module cast to the plan's dtype on the training
device; pretrained weights load tensor by tensor into the dtype on the device. ``use_cache=False`` (packed sequences need it) and non-reentrant
gradient checkpointing when recompute is "full".

``TrainModel`` is the module DeepSpeed wraps: body -> hidden states -> our loss. The
output head is called as a module (``LossHead``) so that ZeRO-3's hooks gather its
weight before the loss uses it, and the full logits are never made by transformers.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..job.constants import IGNORE_INDEX
from ..planner.schema import Plan
from . import attention
from .errors import TrainerInputError
from .lora import apply_adapters, quantize_linears
from .loss import causal_lm_loss, load_balancing_loss



class LossHead(nn.Linear):
    """The model's lm_head, able to return the loss instead of the logits."""

    mode = "full"
    chunk_tokens = 4096
    softcap = None  # the config's final_logit_softcapping (gemma2): c * tanh(logits / c)

    def forward(self, hidden_states, labels=None):
        if labels is None:
            return F.linear(hidden_states, self.weight, self.bias)  # the CausalLM forward caps these itself
        return causal_lm_loss(hidden_states, self.weight, labels, self.mode, self.chunk_tokens, self.softcap)


class RouterStats(NamedTuple):
    """One micro batch's routing on this rank (mixture-of-experts models), detached."""

    lm_loss_sum: torch.Tensor  # fp32 sum of the token losses (the returned loss_sum less the aux term)
    aux_loss: torch.Tensor  # fp32 load-balancing loss of the micro batch (loss.load_balancing_loss)
    expert_tokens: torch.Tensor  # fp32 (moe layers, experts): target tokens routed to each expert


class TrainModel(nn.Module):
    """forward(input_ids, position_ids, labels[, cu_seqlens, max_seqlen]) -> (loss_sum, num_tokens).

    Mixture-of-experts models (``moe_blocks`` given): forward hooks on each sparse block's router
    record its logits and the top-k experts it chose, during this forward only (not during the
    recompute of a checkpointed layer in backward). loss_sum is then the objective
    ``sum of token losses + router_aux_loss_coef x num_tokens x aux`` (aux: ``loss.load_balancing_loss``
    over this micro batch's target tokens; coefficient 0 adds nothing), so that the trainer's
    division by the global token count averages the aux loss over micro batches and ranks as it
    averages the LM loss (weighted by their tokens); ``router_stats`` keeps the parts for the log.
    """

    def __init__(self, lm: nn.Module, moe_blocks: list[nn.Module] | None = None, num_experts: int = 0,
                 aux_loss_coef: float = 0.0):
        super().__init__()
        self.lm = lm
        self.aux_loss_coef = float(aux_loss_coef)
        self.num_experts = num_experts if moe_blocks else 0
        self.router_stats: RouterStats | None = None
        self._records: list | None = None  # (router logits, top-k indices) of each MoE layer, while recording
        if moe_blocks:
            for block in moe_blocks:
                block.gate.register_forward_hook(self._record_router)

    def _record_router(self, module, args, output) -> None:
        # every family's router returns (logits, top-k weights, top-k indices) (transformers 5.24
        # MixtralTopKRouter, Qwen2Moe/Qwen3MoeTopKRouter, DeepseekV2/V3TopkRouter)
        if self._records is not None:
            self._records.append((output[0], output[2]))

    def forward(self, input_ids, position_ids, labels, cu_seqlens=None, max_seqlen=None):
        kwargs = {}
        if cu_seqlens is not None:
            kwargs = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen)
        self._records = [] if self.num_experts else None
        try:
            out = self.lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs)
            records = self._records
        finally:
            self._records = None
        loss_sum, num_tokens = self.lm.lm_head(out.last_hidden_state, labels)
        if not self.num_experts:
            return loss_sum, num_tokens
        # without a coefficient the loss is only logged: no graph, so no layer's fp32 softmax is kept
        with contextlib.nullcontext() if self.aux_loss_coef else torch.no_grad():
            aux, expert_tokens = load_balancing_loss(
                [r[0] for r in records], [r[1] for r in records], labels != IGNORE_INDEX, self.num_experts
            )
        self.router_stats = RouterStats(loss_sum.detach().float(), aux.detach(), expert_tokens)
        if self.aux_loss_coef:
            loss_sum = loss_sum + self.aux_loss_coef * num_tokens * aux
        return loss_sum, num_tokens


#: the sparse MoE block of each family, a ZeRO-3 leaf module (transformers 5.24 modeling_<family>.py)
MOE_BLOCK_CLASSES = {
    "mixtral": "MixtralSparseMoeBlock",
    "qwen2_moe": "Qwen2MoeSparseMoeBlock",
    "qwen3_moe": "Qwen3MoeSparseMoeBlock",
    "deepseek_v2": "DeepseekV2Moe",
    "deepseek_v3": "DeepseekV3MoE",
}


def moe_blocks(lm: nn.Module, family: str) -> list[nn.Module]:
    """The model's sparse MoE blocks (one per MoE layer, in layer order); ValueError when a MoE
    family's model holds none (a remote-code model of another class)."""
    name = MOE_BLOCK_CLASSES[family]
    blocks = [m for m in lm.modules() if type(m).__name__ == name]
    if not blocks:
        raise ValueError(f"model family {family!r}: the built model has no {name} (the sparse MoE block)")
    return blocks


#: transformers' experts implementation for MoE models (config._experts_implementation)
EXPERTS_IMPLEMENTATION = "grouped_mm"


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
        if plan.model.architecture.rope_scaling is not None:  # the plan's rope_scaling block wins
            apply_rope_scaling(config, plan.model.architecture.rope_scaling)
    else:
        fields = dict(plan.model.architecture.to_hf_config())
        fields.pop("architectures", None)
        model_type = fields.pop("model_type")
        config = AutoConfig.for_model(model_type, **fields)
    config.use_cache = False
    config._attn_implementation = attn_impl
    if plan.model.architecture.is_moe:
        # the experts as one grouped matmul over the tokens sorted by expert (transformers
        # integrations/moe.py grouped_mm_experts_forward): what the planner counts, whatever the routing
        config._experts_implementation = EXPERTS_IMPLEMENTATION
        # TrainModel's hooks record the router logits and the experts chosen (transformers' own
        # recorder, output_router_logits, keeps the logits only, and DeepSeek-V3's choice, sigmoid
        # plus correction bias within groups, cannot be recomputed from them): not twice
        config.output_router_logits = False
    return config


def apply_rope_scaling(config, rope_scaling: dict) -> None:
    """Merge a config.json-style rope_scaling block into a loaded transformers 5 config's
    rope_parameters (keeping its rope_theta); per-layer-type parameters (gemma3) scale the
    global (full_attention) layers only, as Gemma3TextConfig.convert_rope_params_to_dict does."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:
        params["full_attention"] = {**params["full_attention"], **rope_scaling}
    else:
        params = {**params, **rope_scaling}
    config.rope_parameters = params
    if hasattr(config, "validate_rope"):
        config.validate_rope()


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


def _checkpoint_plan(lm: nn.Module, folder: str) -> tuple[dict[str, Path], list[tuple[str, list[str], nn.Parameter]]]:
    """Where each checkpoint key is, and for each parameter (a tied one once) the key it loads
    from, all its names, and itself. A tied parameter answers to every name it has
    (lm_head.weight and model.embed_tokens.weight): any one of them in the checkpoint is enough
    (transformers omits the tied output head). Only the file headers are read."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for file in _checkpoint_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                where[key] = file
    names_of: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, param in lm.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
        params[id(param)] = param
    entries, missing = [], []
    for key, names in names_of.items():
        found = [n for n in names if n in where]
        if found:
            entries.append((found[0], names, params[key]))
        else:
            missing.append(names[0])
    if missing:
        raise TrainerInputError(f"model.path: {folder} lacks {len(missing)} weights (first: {missing[0]})")
    return where, entries


class _Readers(dict):
    """Open safetensors files by path, closed together."""

    def tensor(self, file: Path, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if file not in self:
            self[file] = safe_open(str(file), framework="pt").__enter__()
        return self[file].get_tensor(key)

    def close(self) -> None:
        for handle in self.values():
            handle.__exit__(None, None, None)


def _load_safetensors_zero3(lm: nn.Module, folder: str) -> None:
    """Copy a safetensors checkpoint into ZeRO-3 partitions, one parameter at a time.

    Every rank reads the file headers (cheap) so that a missing weight fails everywhere
    at once; rank 0 reads the tensors and GatheredParameters(modifier_rank=0) scatters
    them into the partitions.
    """
    import deepspeed
    import torch.distributed as dist

    where, entries = _checkpoint_plan(lm, folder)
    rank = dist.get_rank() if dist.is_initialized() else 0
    readers = _Readers()
    try:
        with torch.no_grad():
            for key, _, param in entries:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if rank == 0:
                        param.data.copy_(readers.tensor(where[key], key))
    finally:
        readers.close()


def _load_safetensors_local(lm: nn.Module, folder: str, device, dtype) -> None:
    """A meta-built model's parameters read from the checkpoint one at a time, cast to `dtype`
    and placed on `device` (tied names share the one parameter); then its meta buffers (RoPE's
    inv_freq) made by the model's own _init_weights, on the CPU, and moved."""
    from transformers import initialization as hf_init

    where, entries = _checkpoint_plan(lm, folder)
    readers = _Readers()
    try:
        for key, names, param in entries:
            t = readers.tensor(where[key], key)
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
            loaded = nn.Parameter(t, requires_grad=param.requires_grad)
            loaded._is_hf_initialized = True  # transformers' guarded init functions leave it alone
            for name in names:
                owner, _, attr = name.rpartition(".")
                lm.get_submodule(owner)._parameters[attr] = loaded
    finally:
        readers.close()
    with torch.no_grad(), hf_init.guard_torch_init_functions(), torch.device("cpu"):
        for module in lm.modules():
            if any(b is not None and b.is_meta for b in module._buffers.values()):
                _materialize(module, device)
                lm._init_weights(module)
                _materialize(module, device, dtype)


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
        lm.tie_weights()  # before the load: the tied output head is the embedding, not a missing weight
        _load_safetensors_zero3(lm, plan.model.path)
    else:
        initialize_weights_zero3(lm)
        lm.tie_weights()
    return lm


#: random fills (tensor methods and torch.nn.init functions): on a meta tensor they draw nothing
_RNG_FILLS = frozenset({"uniform_", "normal_", "random_", "bernoulli_", "exponential_", "geometric_", "log_normal_",
                        "cauchy_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                        "xavier_normal_", "orthogonal_", "sparse_"})
#: random factories: made on meta by the device context, they draw nothing either
_RNG_FACTORIES = frozenset({"rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial",
                            "rand_like", "randn_like", "randint_like"})


def _on_cpu(value):
    """A meta tensor as an empty CPU tensor of its shape and dtype; anything else as is."""
    if isinstance(value, torch.Tensor) and value.is_meta:
        return torch.empty(value.shape, dtype=value.dtype, device="cpu")
    return value


class _HostDraws(torch.overrides.TorchFunctionMode):
    """During a meta-device build, make each random draw on a meta tensor again on a CPU
    scratch tensor of its shape and dtype (then dropped): the CPU generator then advances
    exactly as in a CPU build, and the weights drawn after it are the same. A mode sees the
    outermost call only (nn.init.kaiming_uniform_, not the uniform_ inside it)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        values = list(args) + list(kwargs.values())
        if name in _RNG_FILLS and any(isinstance(v, torch.Tensor) and v.is_meta for v in values):
            func(*map(_on_cpu, args), **{k: _on_cpu(v) for k, v in kwargs.items()})
        elif name in _RNG_FACTORIES and isinstance(out, torch.Tensor) and out.is_meta:
            func(*map(_on_cpu, args), **{**{k: _on_cpu(v) for k, v in kwargs.items()}, "device": "cpu"})
        return out


def _materialize(module: nn.Module, device, dtype=None) -> None:
    """module's own parameters and buffers: meta -> empty fp32 on the CPU (dtype None), or
    -> `device` in `dtype` (floating parameters; buffers keep their dtype)."""
    for name, param in module._parameters.items():
        if param is None:
            continue
        if dtype is None:
            if param.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty_like(param, device="cpu"), param.requires_grad)
        elif param.device != device or (param.is_floating_point() and param.dtype != dtype):
            data = param.data.to(device=device, dtype=dtype if param.is_floating_point() else None)
            module._parameters[name] = nn.Parameter(data, param.requires_grad)
    for name, buf in module._buffers.items():
        if buf is None:
            continue
        if dtype is None:
            if buf.is_meta:
                module._buffers[name] = torch.empty_like(buf, device="cpu")
        elif buf.device != device:
            module._buffers[name] = buf.to(device)


def _initialize_on_device(lm: nn.Module, device, dtype) -> None:
    """transformers' initialize_weights (the same module order, `smart_apply`), on fp32 CPU
    tensors one module at a time; a module's parameters go to `device` in `dtype` once its
    parent's init has run too (an `_init_weights` may set its children's parameters, as
    transformers' initialize_weights_zero3 allows for)."""
    from transformers import initialization as hf_init
    from transformers.modeling_utils import PreTrainedModel

    remote = lm.is_remote_code()

    def visit(module: nn.Module, fn) -> None:
        for child in module.children():
            visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else fn)
        _materialize(module, device)
        for child in module.children():
            _materialize(child, device)
        fn(module, remote)
        for child in module.children():
            _materialize(child, device, dtype)

    with torch.no_grad(), hf_init.guard_torch_init_functions(), torch.device("cpu"):
        visit(lm, lm._initialize_weights)
        _materialize(lm, device, dtype)


@contextlib.contextmanager
def _init_weights_on_device(device, dtype):
    """transformers' post_init initialises each (sub)model as soon as it is built, between the
    constructors' draws: do it there, on the device (_initialize_on_device), and leave the
    tying to the caller (after the whole init, as PreTrainedModel.init_weights does)."""
    from transformers.modeling_utils import PreTrainedModel

    original = PreTrainedModel.init_weights
    PreTrainedModel.init_weights = lambda self: _initialize_on_device(self, device, dtype)
    try:
        yield
    finally:
        PreTrainedModel.init_weights = original


def _target_device() -> torch.device:
    from .engine import device

    return device()


def _build_local(plan: Plan, config) -> nn.Module:
    """ZeRO 0-2: the whole model on this rank's device, in the plan's dtype, never whole in
    fp32 on the host.

    Pretrained: built on meta, then read tensor by tensor into the dtype on the device
    (transformers' own device_map loading needs accelerate). Random: built on meta (the CPU
    generator kept in step by _HostDraws), tying deferred as from_config does it (after the init), then initialised
    on the CPU in fp32 module by module and cast on the way to the device: fp32 then cast,
    as DeepSpeed's own cast of a CPU-built fp32 model gave, so the weights are unchanged.
    """
    from transformers import AutoModelForCausalLM
    from transformers import initialization as hf_init

    dtype = torch_dtype(plan.training.precision)
    if torch.get_default_device().type == "meta":  # a caller building on meta (the tracer): nothing to place
        if plan.model.path:
            _checkpoint_files(plan.model.path)
        return AutoModelForCausalLM.from_config(config, trust_remote_code=plan.model.trust_remote_code)
    device = _target_device()
    if plan.model.path:
        with torch.device("meta"), hf_init.no_init_weights():
            lm = AutoModelForCausalLM.from_config(config, trust_remote_code=plan.model.trust_remote_code)
        lm.tie_weights()  # before the load: the tied output head is the embedding, not a missing weight
        _load_safetensors_local(lm, plan.model.path, device, dtype)
        return lm
    with torch.device("meta"), hf_init.no_tie_weights(), _HostDraws(), _init_weights_on_device(device, dtype):
        lm = AutoModelForCausalLM.from_config(config, trust_remote_code=plan.model.trust_remote_code)
    _initialize_on_device(lm, device, dtype)  # what no post_init reached (none in transformers' models)
    lm.tie_weights()
    return lm


def build_model(plan: Plan, ds_config: dict | None = None) -> TrainModel:
    """The model of the plan, ready for deepspeed.initialize (partitioned under ZeRO-3).

    Random init is seeded with training.seed (rank 0 initialises under ZeRO-3). LoRA/QLoRA: the
    adapters are added to the built model (lora.apply_adapters; QLoRA first stores the decoder's
    linear layers in 4 bits on the device, lora.quantize_linears, ZeRO 0-2 only).
    """
    impl = attn_implementation(plan)
    config = hf_config(plan, impl)
    torch.manual_seed(plan.training.seed)
    if ds_config is not None and plan.layout.zero_stage == 3:
        lm = _build_zero3(plan, config, ds_config)
    else:
        lm = _build_local(plan, config)
    if plan.method.kind == "qlora" and torch.get_default_device().type != "meta":
        lm = quantize_linears(lm, plan, _target_device())  # 4-bit frozen weights (ZeRO 0-2), then the adapters
    lm = apply_adapters(lm, plan)
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
    # the body (lm.model: embedding scale, GeGLU, four norms, q/k norms, windows) is the family's
    # own transformers forward; the one step of its CausalLM forward we replace is the head's
    head.softcap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
    lm.train()
    arch = plan.model.architecture
    if not arch.is_moe:
        return TrainModel(lm)
    blocks = moe_blocks(lm, arch.family)
    if plan.layout.zero_stage == 3:
        # ZeRO-3 gathers a module's parameters in its pre-forward hook. With experts as separate
        # modules (transformers 4), a rank whose tokens skip an expert never calls it, and the
        # ranks that do wait for it in the gather: a hang. transformers 5 stores the experts as
        # one module of 3-D tensors (gate_up_proj E x 2F x h, down_proj E x h x F) that every
        # rank calls whatever the routing, so that cannot happen here; the leaf setting still
        # makes it impossible (no hooks below the block: router, experts and shared experts are
        # gathered at once on entering it, and released on leaving) and saves ZeRO-3's
        # module-order trace, which routing would vary (deepspeed.utils.set_z3_leaf_modules).
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(lm, [MOE_BLOCK_CLASSES[arch.family]])
    return TrainModel(lm, blocks, arch.num_experts, arch.router_aux_loss_coef)


def unwrap_state_dict(state_dict: dict) -> dict:
    """TrainModel's state dict keys ("lm.model...") as the HF model's ("model...")."""
    return {k.removeprefix("lm."): v for k, v in state_dict.items()}
