"""Layout-independent numbers of a (model, context) pair, and element sizes."""

from __future__ import annotations

from dataclasses import dataclass

from ..profiles.schema import ModelProfile
from . import lora
from .schema import Layout, Method

FP32 = 4  # bytes of an fp32 element
#: bytes of one element of the model dtype (parameters, their gradients, activations)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def upcast_copy_bytes(dtype_bytes: int) -> int:
    """Bytes of the model-dtype copy made when an fp32 result is cast back (or a model-dtype
    tensor is upcast): none when the model dtype is fp32 itself, where `.float()` and
    `.to(fp32)` return their input."""
    return 0 if dtype_bytes == FP32 else dtype_bytes


@dataclass(frozen=True, slots=True)
class Shape:
    """Layout-independent numbers of one (model, seq_len) pair, computed once per plan."""

    params: int
    num_layers: int
    hidden_size: int
    q_size: int
    kv_size: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    largest_leaf_params: int  # biggest module ZeRO-3 gathers at once
    layer_params: int
    persistent_params: int  # tensors at or below stage3_param_persistence_threshold
    seq_len: int
    precision: str = "bf16"
    loss_chunk_tokens: int = 4096
    doc_tokens: int | None = None  # mean packed document length; None: one document fills the sequence
    # family features that change what a layer keeps (ModelProfile's fields of the same names)
    num_kv_heads: int = 0  # 0: num_attention_heads (multi-head attention)
    qk_norm: bool = False  # RMSNorm over each head of q and k (qwen3, gemma3)
    gemma_norms: bool = False  # Gemma2RMSNorm/Gemma3RMSNorm: normalised and scaled in fp32, cast at the end
    norms_per_layer: int = 2  # gemma2/3: 4 (two of them feed the residual add, not a linear layer)
    fused_qkv: bool = False  # phi3: one qkv_proj output, sliced into q, k, v
    final_logit_softcapping: bool = False  # gemma2: tanh soft-cap of the logits in the loss
    attn_logit_softcapping: bool = False  # gemma2: tanh soft-cap of the attention scores
    local_layers: int = 0  # sliding-window layers (transformers makes them their own mask, gemma3 its own RoPE)
    local_rope: bool = False  # gemma3: local layers have their own RoPE cos/sin (rope_local_base_freq)
    head_major_rope: bool = False  # phi3: RoPE's torch.cat leaves q head-major, so flash's output is too
    # pre-Ampere GPU: varlen attention runs SDPA's math backend once per document (trainer/attention.py)
    sdpa_math: bool = False
    # what trains (planner/lora.py): "full", or adapters on frozen weights ("lora", "qlora")
    method: str = "full"
    trainable_params: int = 0  # parameters the optimizer updates (all of them for full)
    lora_rank: int = 0
    lora_dropout: bool = False  # a dropout before each adapter (saves its mask and output)
    #: (in_features, out_features) of each adapted linear layer of one decoder layer
    adapter_modules: tuple[tuple[int, int], ...] = ()
    #: their module names (q_proj, ..., down_proj), in the same order: which tensors they keep (activations.py)
    adapter_names: tuple[str, ...] = ()
    quantized_params: int = 0  # base weights stored in 4 bits (qlora)
    quantized_bytes: int = 0  # those weights with their quantization constants
    largest_quantized_params: int = 0  # the biggest 4-bit weight (dequantized whole while its layer computes)

    # mixture of experts (ModelProfile's fields of the same names; 0 experts: dense)
    layers_params: int = 0  # all decoder layers' parameters (MoE models mix dense and MoE layers)
    active_params: int = 0  # parameters one token uses (all of them for a dense model)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    num_moe_layers: int = 0
    moe_block_params: int = 0  # one MoE layer's router, routed and shared experts: one ZeRO-3 leaf module
    shared_expert_intermediate_size: int = 0  # the shared experts' total width (deepseek: n x moe width)
    shared_expert_gate: bool = False  # qwen2_moe: a sigmoid gate (1 output) on the shared expert
    router_scoring: str = "softmax"
    family: str = ""  # ModelProfile.family
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0  # > 0: the trainer adds the load-balancing loss (trainer/loss.py)
    # multi-head latent attention (deepseek); 0: none
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    value_head_size: int = 0  # a value head's size (the head size unless MLA)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def adapters(self) -> bool:
        """LoRA or QLoRA: frozen base weights, trainable adapters."""
        return self.method != "full"

    @property
    def optimized_params(self) -> int:
        """Parameters with gradients and optimizer states: all of them (full), the adapters' (lora, qlora)."""
        return self.trainable_params if self.adapters else self.params

    @property
    def stored_params(self) -> int:
        """Every parameter the model holds: the base weights, and the adapters beside them (LoRA, QLoRA)."""
        return self.params + self.trainable_params if self.adapters else self.params

    @property
    def attention_tokens(self) -> int:
        """Keys a query attends over with per-document (varlen) attention: the mean document
        length, at most the sequence."""
        return self.seq_len if self.doc_tokens is None else min(self.doc_tokens, self.seq_len)

    @property
    def kv_heads(self) -> int:
        """Key/value heads (num_attention_heads when not given)."""
        return self.num_kv_heads or self.num_attention_heads

    @property
    def dtype_bytes(self) -> int:
        """Bytes of one element of the model dtype."""
        return DTYPE_BYTES[self.precision]

    @classmethod
    def of(
        cls, model: ModelProfile, seq_len: int, precision: str = "bf16", loss_chunk_tokens: int = 4096,
        *, doc_tokens: int | None = None, sdpa_math: bool = False, method: Method | None = None,
    ) -> "Shape":
        if doc_tokens is not None and doc_tokens <= 0:
            raise ValueError(f"doc_tokens must be a positive number of tokens (got {doc_tokens})")
        local = sum(1 for i in range(model.num_layers) if model.is_local_layer(i))
        method = method or Method()
        quantized = lora.quantized_tensors_per_layer(model, method)
        return cls(
            params=model.num_params(),
            num_layers=model.num_layers,
            hidden_size=model.hidden_size,
            q_size=model.q_size,
            kv_size=model.kv_size,
            num_attention_heads=model.num_attention_heads,
            intermediate_size=model.intermediate_size,
            vocab_size=model.vocab_size,
            tie_word_embeddings=model.tie_word_embeddings,
            largest_leaf_params=model.largest_tensor_params(),
            layer_params=model.layer_params(),
            persistent_params=model.persistent_params(),
            seq_len=seq_len,
            precision=precision,
            loss_chunk_tokens=loss_chunk_tokens,
            doc_tokens=doc_tokens,
            num_kv_heads=model.num_kv_heads,
            qk_norm=model.qk_norm,
            gemma_norms=model.family in ("gemma2", "gemma3"),
            norms_per_layer=model.norms_per_layer,
            fused_qkv=model.fused_qkv,
            final_logit_softcapping=model.final_logit_softcapping is not None,
            attn_logit_softcapping=model.attn_logit_softcapping is not None,
            local_layers=local,
            local_rope=model.family == "gemma3" and 0 < local < model.num_layers,
            head_major_rope=model.family == "phi3",
            sdpa_math=sdpa_math,
            method=method.kind,
            trainable_params=lora.trainable_params(model, method),
            lora_rank=method.lora_rank if method.adapters else 0,
            lora_dropout=method.adapters and method.lora_dropout > 0,
            adapter_modules=tuple(lora.target_modules(model, method).values()) if method.adapters else (),
            adapter_names=tuple(lora.target_modules(model, method)) if method.adapters else (),
            quantized_params=lora.quantized_params(model, method),
            quantized_bytes=lora.quantized_bytes(model, method),
            largest_quantized_params=max(quantized, default=0),
            layers_params=model.layers_params(),
            active_params=model.active_params(),
            num_experts=model.num_experts,
            num_experts_per_tok=model.num_experts_per_tok,
            moe_intermediate_size=model.moe_intermediate_size or 0,
            num_moe_layers=model.num_moe_layers,
            moe_block_params=sum(model.moe_tensors()) if model.is_moe else 0,
            shared_expert_intermediate_size=(
                model.shared_expert_intermediate_size or 0 if model.family == "qwen2_moe"
                else model.num_shared_experts * (model.moe_intermediate_size or 0)),
            shared_expert_gate=model.family == "qwen2_moe" and bool(model.shared_expert_intermediate_size),
            router_scoring=model.router_scoring,
            family=model.family,
            norm_topk_prob=model.norm_topk_prob,
            router_aux_loss_coef=model.router_aux_loss_coef if model.is_moe else 0.0,
            q_lora_rank=model.q_lora_rank or 0,
            kv_lora_rank=model.kv_lora_rank or 0,
            qk_rope_head_dim=model.qk_rope_head_dim or 0,
            value_head_size=model.value_head_size,
        )


def tokens_per_rank(shape: Shape, layout: Layout) -> int:
    """Ulysses splits each sequence over sp_degree ranks (Jacobs et al. 2023, DeepSpeed-Ulysses)."""
    return layout.micro_batch_size * -(-shape.seq_len // layout.sp_degree)
