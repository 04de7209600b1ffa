"""Frozen data models for model and GPU profiles (pure Python: pydantic only)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

GIB = 2**30
GB = 10**9

#: control characters (C0, DEL, C1) and the Unicode line and paragraph separators
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_printable_line(value: str) -> str:
    """A string that reaches a path, a script or a process holds no control character
    (newline, NUL, escape, ...)."""
    if CONTROL_CHARACTERS.search(value):
        raise ValueError("holds a control character (newline, NUL, escape, ...)")
    return value


#: a name shown to people and written into scripts and paths: one line, printable
Label = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(one_printable_line)]


#: the mixture-of-experts families ltune builds (transformers 5's fused 3-D expert tensors)
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")


class ModelProfile(BaseModel):
    """A decoder-only transformer's architecture, as its config.json publishes it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Label
    source: str = Field(description="where the numbers come from (the config.json it copies)")
    family: Literal["llama", "internlm2", "qwen2", "mistral", "generic", "qwen3", "gemma2", "gemma3", "phi3",
                    "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]
    # upper bounds far above any published model: they keep arithmetic on nonsense finite
    hidden_size: int = Field(gt=0, le=2**20)
    num_layers: int = Field(gt=0, le=100_000)
    num_attention_heads: int = Field(gt=0, le=2**16)
    num_kv_heads: int = Field(gt=0, le=2**16)
    intermediate_size: int = Field(gt=0, le=2**24)
    vocab_size: int = Field(gt=0, le=2**26)
    head_dim: int | None = Field(default=None, gt=0, le=2**16, description="defaults to hidden_size / num_attention_heads")
    tie_word_embeddings: bool = False
    attention_bias: bool = Field(default=False, description="q/k/v projections carry a bias (Qwen2)")
    max_position_embeddings: int = Field(default=4096, gt=0, le=2**40)
    rope_theta: float = Field(default=10000.0, gt=0, allow_inf_nan=False)
    rms_norm_eps: float = Field(default=1e-5, gt=0, lt=1, allow_inf_nan=False)
    generic: bool = Field(default=False, description="a llama-shaped stand-in for a bare size, not a real model")
    qk_norm: bool = Field(default=False, description="RMSNorm over each head of q and k (qwen3, gemma3)")
    mlp_activation: Literal["silu", "gelu_tanh"] = Field(
        default="silu", description="gated MLP: SwiGLU, or GeGLU (gemma: gelu_pytorch_tanh)"
    )
    norms_per_layer: Literal[2, 4] = Field(
        default=2, description="gemma2/3: input, post-attention, pre-feedforward, post-feedforward"
    )
    embedding_multiplier: float = Field(
        default=1.0, gt=0, allow_inf_nan=False,
        description="gemma: hidden states scaled by sqrt(hidden_size) after the embedding",
    )
    final_logit_softcapping: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="gemma2: 30.0 (tanh soft-cap of the logits)"
    )
    attn_logit_softcapping: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="gemma2: 50.0 (soft-cap of attention scores)"
    )
    query_pre_attn_scalar: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="gemma: attention scale 1/sqrt(this) instead of 1/sqrt(head_dim)",
    )
    sliding_window: int | None = Field(default=None, gt=0, le=2**40, description="tokens a local layer attends to")
    sliding_window_pattern: int | None = Field(
        default=None, gt=0, le=100_000,
        description="every Nth layer is global, the others local (gemma2: 2, gemma3: 6); None: all layers global",
    )
    fused_qkv: bool = Field(default=False, description="phi3: one qkv_proj tensor")
    fused_gate_up: bool = Field(default=False, description="phi3: one gate_up_proj tensor")
    rope_scaling: dict | None = Field(
        default=None, description="as config.json has it (llama3, yarn, linear, ...)"
    )
    # mixture of experts (mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3); 0 experts: a dense model
    num_experts: int = Field(default=0, ge=0, le=2**16, description="routed experts of each MoE layer (0: dense)")
    num_experts_per_tok: int = Field(default=0, ge=0, le=2**16, description="experts each token is routed to (top-k)")
    moe_intermediate_size: int | None = Field(
        default=None, gt=0, le=2**24,
        description="one routed expert's gated-MLP width (intermediate_size is the dense layers')",
    )
    num_shared_experts: int = Field(
        default=0, ge=0, le=2**10,
        description="experts every token passes: deepseek, an MLP num_shared_experts x moe_intermediate_size wide; "
        "qwen2_moe, one of shared_expert_intermediate_size behind a sigmoid gate",
    )
    shared_expert_intermediate_size: int | None = Field(
        default=None, gt=0, le=2**24, description="qwen2_moe: the shared expert's width"
    )
    dense_layers: tuple[int, ...] = Field(
        default=(), max_length=100_000,
        description="layers with a dense MLP instead of experts (deepseek: the first first_k_dense_replace; "
        "qwen: mlp_only_layers)",
    )
    router_scoring: Literal["softmax", "sigmoid"] = Field(
        default="softmax", description="expert scores: softmax (mixtral, qwen, deepseek_v2) or sigmoid (deepseek_v3)"
    )
    norm_topk_prob: bool = Field(default=True, description="the top-k weights are renormalised to sum to 1")
    router_groups: int = Field(default=1, gt=0, le=2**10, description="deepseek: expert groups (n_group)")
    router_topk_groups: int = Field(default=1, gt=0, le=2**10, description="deepseek: groups a token may use (topk_group)")
    routed_scaling_factor: float = Field(default=1.0, gt=0, allow_inf_nan=False, description="deepseek: routed output scale")
    router_aux_loss_coef: float = Field(
        default=0.0, ge=0, le=1e3, allow_inf_nan=False,
        description="weight of the load-balancing loss added to the language-model loss",
    )
    # multi-head latent attention (deepseek_v2, deepseek_v3; DeepSeek-V2 paper, arXiv 2405.04434 section 2.1)
    q_lora_rank: int | None = Field(default=None, gt=0, le=2**20, description="MLA: query compression (None: q_proj)")
    kv_lora_rank: int | None = Field(default=None, gt=0, le=2**20, description="MLA: key/value compression; set: MLA")
    qk_rope_head_dim: int | None = Field(default=None, gt=0, le=2**16, description="MLA: rotary part of a q/k head")
    qk_nope_head_dim: int | None = Field(default=None, gt=0, le=2**16, description="MLA: non-rotary part of a q/k head")
    v_head_dim: int | None = Field(default=None, gt=0, le=2**16, description="MLA: a value head's size")

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelProfile":
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads ({self.num_kv_heads}) must divide num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}) when head_dim is not given"
            )
        return self

    @model_validator(mode="after")
    def _check_experts(self) -> "ModelProfile":
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts "
                                 f"({self.num_experts})")
            if self.moe_intermediate_size is None:
                raise ValueError(f"num_experts ({self.num_experts}) needs moe_intermediate_size")
            if self.num_experts % self.router_groups or self.router_topk_groups > self.router_groups:
                raise ValueError(f"router_groups ({self.router_groups}) must divide num_experts ({self.num_experts}) "
                                 f"and be at least router_topk_groups ({self.router_topk_groups})")
        elif self.num_experts_per_tok or self.num_shared_experts or self.dense_layers:
            raise ValueError("num_experts_per_tok, num_shared_experts and dense_layers need num_experts > 0")
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dense_layers ({bad[0]}) must be layer indices in 0..{self.num_layers - 1}")
        mla = (self.kv_lora_rank, self.qk_rope_head_dim, self.qk_nope_head_dim, self.v_head_dim)
        if any(v is not None for v in mla) and any(v is None for v in mla):
            raise ValueError("multi-head latent attention needs kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim "
                             "and v_head_dim together")
        if self.q_lora_rank is not None and self.kv_lora_rank is None:
            raise ValueError("q_lora_rank needs kv_lora_rank (multi-head latent attention)")
        return self

    @property
    def is_moe(self) -> bool:
        """A mixture-of-experts model: routed experts in (some of) its layers."""
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        """Multi-head latent attention (deepseek_v2/v3)."""
        return self.kv_lora_rank is not None

    def is_moe_layer(self, i: int) -> bool:
        """Layer i routes its tokens to experts (not one of dense_layers)."""
        return self.is_moe and i not in self.dense_layers

    @property
    def num_moe_layers(self) -> int:
        return sum(1 for i in range(self.num_layers) if self.is_moe_layer(i))

    @property
    def head_size(self) -> int:
        """A query/key head's size (MLA: its non-rotary plus rotary parts)."""
        if self.is_mla:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def value_head_size(self) -> int:
        """A value head's size (MLA's v_head_dim; otherwise the head size)."""
        return self.v_head_dim if self.is_mla else self.head_size

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_size

    def attention_tensors(self) -> list[int]:
        """Elements of each attention tensor of one layer, as transformers builds them: q/k/v
        (one fused qkv_proj in phi3), o_proj, biases (q/k/v for qwen2; q/k/v and o_proj for the
        other families' attention_bias), and the per-head q/k RMSNorm weights (qwen3, gemma3);
        multi-head latent attention: `mla_tensors`."""
        if self.is_mla:
            return self.mla_tensors()
        h, q, kv = self.hidden_size, self.q_size, self.kv_size
        tensors = [h * (q + 2 * kv)] if self.fused_qkv else [h * q, h * kv, h * kv]
        tensors.append(q * h)
        if self.attention_bias:
            tensors += [q + 2 * kv] if self.fused_qkv else [q, kv, kv]
            if self.family not in ("qwen2", "qwen2_moe"):  # Qwen2(Moe)Attention: o_proj bias=False; Llama/Qwen3/Gemma: o_proj bias=attention_bias
                tensors.append(h)
        if self.qk_norm:
            tensors += [self.head_size, self.head_size]
        return tensors

    def linear_modules(self) -> dict[str, tuple[int, int]]:
        """One decoder layer's linear layers by their transformers module name: (in_features,
        out_features). Llama, Qwen, Mistral and Gemma name them q/k/v/o_proj and gate/up/down_proj
        (modeling_llama.py `LlamaAttention`, `LlamaMLP`); Phi-3 fuses qkv_proj and gate_up_proj
        (modeling_phi3.py); internlm2 and generic shapes are built as Llama."""
        h, q, kv, f = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        if self.is_moe:  # the experts are 3-D parameters, not linear layers: attention only
            return self._attention_linear_modules()
        attention = {"qkv_proj": (h, q + 2 * kv)} if self.fused_qkv else {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv)}
        mlp = {"gate_up_proj": (h, 2 * f)} if self.fused_gate_up else {"gate_proj": (h, f), "up_proj": (h, f)}
        return {**attention, "o_proj": (q, h), **mlp, "down_proj": (f, h)}

    def mla_tensors(self) -> list[int]:
        """Multi-head latent attention's tensors (modeling_deepseek_v2.py `DeepseekV2Attention`): q_proj,
        or q_a_proj, q_a_layernorm and q_b_proj with q_lora_rank; kv_a_proj_with_mqa (the compressed kv
        and the shared rotary key), kv_a_layernorm, kv_b_proj (every head's non-rotary key and value),
        o_proj. No biases."""
        h, heads = self.hidden_size, self.num_attention_heads
        qk, nope, rope, v = self.head_size, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        kv_rank = self.kv_lora_rank
        if self.q_lora_rank is None:
            q = [h * heads * qk]
        else:
            q = [h * self.q_lora_rank, self.q_lora_rank, self.q_lora_rank * heads * qk]
        return q + [h * (kv_rank + rope), kv_rank, kv_rank * heads * (nope + v), heads * v * h]

    def _attention_linear_modules(self) -> dict[str, tuple[int, int]]:
        """The attention's linear layers (MLA's own names: modeling_deepseek_v2.py)."""
        h, heads = self.hidden_size, self.num_attention_heads
        if not self.is_mla:
            return {"q_proj": (h, self.q_size), "k_proj": (h, self.kv_size), "v_proj": (h, self.kv_size),
                    "o_proj": (self.q_size, h)}
        q = ({"q_proj": (h, self.q_size)} if self.q_lora_rank is None else
             {"q_a_proj": (h, self.q_lora_rank), "q_b_proj": (self.q_lora_rank, self.q_size)})
        return {**q, "kv_a_proj_with_mqa": (h, self.kv_lora_rank + self.qk_rope_head_dim),
                "kv_b_proj": (self.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim)),
                "o_proj": (heads * self.v_head_dim, h)}

    def mlp_tensors(self) -> list[int]:
        """Elements of each gated-MLP tensor of one dense layer (gate_up_proj fused in phi3)."""
        h, f = self.hidden_size, self.intermediate_size
        return ([2 * f * h] if self.fused_gate_up else [f * h, f * h]) + [h * f]

    def expert_tensors(self) -> list[int]:
        """The routed experts of one MoE layer, as transformers 5 stores them: one 3-D gate_up_proj
        (experts x 2F x h) and one down_proj (experts x h x F) (modeling_mixtral.py `MixtralExperts`)."""
        e, h, f = self.num_experts, self.hidden_size, self.moe_intermediate_size
        return [e * 2 * f * h, e * h * f]

    def shared_expert_tensors(self) -> list[int]:
        """The shared experts of one MoE layer: deepseek's one gated MLP of num_shared_experts x
        moe_intermediate_size (modeling_deepseek_v2.py `DeepseekV2Moe.shared_experts`); qwen2_moe's
        gated MLP of shared_expert_intermediate_size and its 1-output sigmoid gate
        (modeling_qwen2_moe.py `Qwen2MoeSparseMoeBlock.shared_expert_gate`)."""
        h = self.hidden_size
        if self.family == "qwen2_moe" and self.shared_expert_intermediate_size:
            f = self.shared_expert_intermediate_size
            return [f * h, f * h, h * f, h]
        if self.num_shared_experts:
            f = self.num_shared_experts * self.moe_intermediate_size
            return [f * h, f * h, h * f]
        return []

    def moe_tensors(self) -> list[int]:
        """One MoE layer's MLP: the router (experts x h; deepseek_v3's score-correction bias is a
        buffer), the routed experts and the shared ones."""
        return [self.num_experts * self.hidden_size] + self.expert_tensors() + self.shared_expert_tensors()

    def layer_tensors(self, i: int | None = None) -> list[int]:
        """Elements of each parameter tensor of decoder layer i: attention, MLP (dense, or the MoE
        layer's router and experts) and its RMSNorm weights (2, or 4 in gemma2/3). i None: a
        typical layer (the first MoE layer of a MoE model, else any)."""
        if i is None:
            i = next((j for j in range(self.num_layers) if self.is_moe_layer(j)), 0)
        mlp = self.moe_tensors() if self.is_moe_layer(i) else self.mlp_tensors()
        return self.attention_tensors() + mlp + [self.hidden_size] * self.norms_per_layer

    def layer_params(self, i: int | None = None) -> int:
        """Parameters of decoder layer i (None: a typical layer): attention, MLP or experts, norms."""
        return sum(self.layer_tensors(i))

    def layers_params(self) -> int:
        """Parameters of all decoder layers (MoE models mix dense and MoE layers)."""
        if not self.is_moe:
            return self.num_layers * self.layer_params()
        moe = self.num_moe_layers
        dense = self.num_layers - moe
        return moe * self.layer_params() + (dense * self.layer_params(min(self.dense_layers)) if dense else 0)

    def inactive_expert_params_per_layer(self) -> int:
        """Routed-expert parameters of one MoE layer that a token does not use: the experts it is
        not routed to (num_experts - top-k of them)."""
        if not self.is_moe:
            return 0
        return (self.num_experts - self.num_experts_per_tok) * sum(self.expert_tensors()) // self.num_experts

    def active_params(self) -> int:
        """Parameters one token uses: all but the routed experts it is not sent to (the 'active'
        count of MoE model cards: Mixtral-8x7B 12.9B of 46.7B)."""
        return self.num_params() - self.num_moe_layers * self.inactive_expert_params_per_layer()

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def num_params(self) -> int:
        """All parameters: embeddings, layers, final norm and (untied) output head."""
        return (
            self.embedding_params()
            + self.layers_params()
            + self.hidden_size
            + self.lm_head_params()
        )

    def _layer_kinds(self) -> list[tuple[int, int]]:
        """(a layer of each kind, how many layers are of that kind): one kind for dense models."""
        if not self.is_moe or not self.dense_layers:
            return [(self.num_layers - 1, self.num_layers)]
        moe = self.num_moe_layers
        kinds = [(min(self.dense_layers), self.num_layers - moe)]
        if moe:
            kinds.append((next(j for j in range(self.num_layers) if self.is_moe_layer(j)), moe))
        return kinds

    def largest_tensor_params(self) -> int:
        """The biggest single parameter tensor (the embedding, an MLP / fused matrix, or a MoE
        layer's 3-D expert tensor)."""
        return max(self.embedding_params(), *(n for i, _ in self._layer_kinds() for n in self.layer_tensors(i)))

    def persistent_params(self, threshold: int = 100_000) -> int:
        """Elements of the tensors ZeRO-3 keeps whole on every rank: those of at most
        `threshold` elements (DeepSpeed's stage3_param_persistence_threshold, default 1e5):
        norms, biases and q/k norm weights in any real model."""
        small = sum(count * sum(n for n in self.layer_tensors(i) if n <= threshold) for i, count in self._layer_kinds())
        whole = [self.embedding_params(), self.hidden_size, self.lm_head_params()]
        return small + sum(n for n in whole if 0 < n <= threshold)

    def is_local_layer(self, i: int) -> bool:
        """Layer i attends to the last `sliding_window` tokens only: every layer but each
        sliding_window_pattern-th (gemma2: `not bool(layer_idx % 2)`; gemma3:
        `(layer_idx + 1) % sliding_window_pattern != 0`, transformers' Gemma2/3 decoder layers)."""
        if not 0 <= i < self.num_layers:
            raise ValueError(f"layer index {i} outside 0..{self.num_layers - 1}")
        if self.sliding_window is None or self.sliding_window_pattern is None:
            return False
        return (i + 1) % self.sliding_window_pattern != 0

    def trained_context(self) -> int:
        """Tokens the model was trained (or scaled) to: max_position_embeddings, or, for a
        yarn / linear / dynamic rope_scaling that names original_max_position_embeddings, that
        length times the factor where longer (Qwen's documented yarn block: 32768 x 4). llama3
        and longrope configs already give the scaled length in max_position_embeddings (Llama
        3.2: factor 32 on 8192 original, trained to 131072), as does gemma3 (linear 8, no
        original length)."""
        n = self.max_position_embeddings
        rs = self.rope_scaling or {}
        kind = rs.get("rope_type", rs.get("type"))
        factor, original = rs.get("factor"), rs.get("original_max_position_embeddings")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (factor, original))
        if kind in ("yarn", "linear", "dynamic") and numbers and factor > 1 and original > 0:
            return max(n, int(original * factor))
        return n

    def to_hf_config(self) -> dict:
        """A transformers config dict that builds this architecture: the family's own class
        (transformers 5.x configuration_<family>.py), Llama for internlm2 and generic shapes.

        Features a family's transformers class does not build (q/k norms on llama, fused
        projections outside phi3, ...) are refused with the feature named, never dropped.
        """
        family = self.family
        self._refuse_unbuildable()
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "head_dim": self.head_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu" if self.mlp_activation == "silu" else "gelu_pytorch_tanh",
        }
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = dict(self.rope_scaling)
        local = [self.is_local_layer(i) for i in range(self.num_layers)] if self.sliding_window else []
        layer_types = ["sliding_attention" if is_local else "full_attention" for is_local in local] or None
        if family == "qwen2":
            # Llama's attention_bias also puts a bias on o_proj; Qwen2 biases q/k/v only.
            cfg = {**cfg, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
            cfg.pop("attention_bias")
        elif family == "qwen3":
            # Qwen3Attention: q_norm/k_norm (RMSNorm over head_dim) built in; per-layer windows via layer_types
            cfg = {**cfg, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                   "use_sliding_window": bool(self.sliding_window), "sliding_window": self.sliding_window,
                   "layer_types": layer_types}
        elif family in ("gemma2", "gemma3"):
            # Gemma2/Gemma3TextConfig: GeGLU (hidden_activation), four norms, sqrt(hidden) embedding
            # scale and (gemma3) q/k norms are built in; scale, windows and soft-caps are config fields.
            cfg.pop("hidden_act")
            cfg = {**cfg, "hidden_activation": "gelu_pytorch_tanh",
                   "query_pre_attn_scalar": self._int_query_pre_attn_scalar(),
                   "sliding_window": self.sliding_window,
                   "layer_types": layer_types or ["full_attention"] * self.num_layers,
                   "final_logit_softcapping": self.final_logit_softcapping,
                   "attn_logit_softcapping": self.attn_logit_softcapping}
            if family == "gemma2":
                cfg = {**cfg, "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"}
            else:  # the text model of Gemma 3 (Gemma3ForCausalLM); local layers keep RoPE theta 10000
                cfg = {**cfg, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}
        elif family == "phi3":
            # Phi3Attention.qkv_proj and Phi3MLP.gate_up_proj: both fused; no biases; one window for all layers
            cfg = {**cfg, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
                   "sliding_window": self._one_window(local),
                   "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
            cfg.pop("attention_bias")
            if self.rope_scaling is not None:
                cfg["original_max_position_embeddings"] = self.rope_scaling.get(
                    "original_max_position_embeddings", self.max_position_embeddings)
        elif family in MOE_FAMILIES:
            cfg = self._moe_hf_config(cfg, layer_types)
        elif family == "mistral":
            # MistralConfig: explicit head_dim (Mistral-Nemo), one window for all layers (None: full)
            cfg = {**cfg, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                   "sliding_window": self._one_window(local)}
            cfg.pop("attention_bias")
        elif self.sliding_window and any(local):
            raise ValueError(f"{self.name}: sliding_window ({self.sliding_window}) on family {family!r}: "
                             "only qwen3, gemma2, gemma3, phi3 and mistral build local attention layers")
        return cfg

    def _moe_hf_config(self, cfg: dict, layer_types: list[str] | None) -> dict:
        """The config dict of a mixture-of-experts family (transformers 5 configuration_<family>.py)."""
        family = self.family
        common = {"num_experts_per_tok": self.num_experts_per_tok, "output_router_logits": False}
        cfg.pop("attention_bias")
        if family == "mixtral":
            # MixtralConfig: every layer sparse, intermediate_size is an expert's width, no shared expert
            return {**cfg, **common, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                    "intermediate_size": self.moe_intermediate_size, "num_local_experts": self.num_experts,
                    "router_aux_loss_coef": self.router_aux_loss_coef, "router_jitter_noise": 0.0,
                    "sliding_window": self._one_window([self.is_local_layer(i) for i in range(self.num_layers)]
                                                       if self.sliding_window else [])}
        if family in ("qwen2_moe", "qwen3_moe"):
            qwen = {**cfg, **common, "num_experts": self.num_experts, "moe_intermediate_size": self.moe_intermediate_size,
                    "decoder_sparse_step": 1, "mlp_only_layers": list(self.dense_layers),
                    "norm_topk_prob": self.norm_topk_prob, "router_aux_loss_coef": self.router_aux_loss_coef,
                    "use_sliding_window": False, "sliding_window": None}
            if family == "qwen2_moe":
                return {**qwen, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
                        "qkv_bias": self.attention_bias,
                        "shared_expert_intermediate_size": self.shared_expert_intermediate_size or 0}
            return {**qwen, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False}
        # deepseek_v2 / deepseek_v3: MLA attention, the first first_k_dense_replace layers dense
        first_dense = len(self.dense_layers)
        if tuple(self.dense_layers) != tuple(range(first_dense)):
            raise ValueError(f"{self.name}: dense_layers {list(self.dense_layers)} cannot be built by {family!r} "
                             "(only the first k layers: first_k_dense_replace)")
        deepseek = {**cfg, **common, "n_routed_experts": self.num_experts, "n_shared_experts": self.num_shared_experts,
                    "moe_intermediate_size": self.moe_intermediate_size, "first_k_dense_replace": first_dense,
                    "kv_lora_rank": self.kv_lora_rank, "q_lora_rank": self.q_lora_rank,
                    "qk_rope_head_dim": self.qk_rope_head_dim, "qk_nope_head_dim": self.qk_nope_head_dim,
                    "v_head_dim": self.v_head_dim, "head_dim": self.qk_rope_head_dim, "n_group": self.router_groups,
                    "topk_group": self.router_topk_groups, "routed_scaling_factor": self.routed_scaling_factor,
                    "norm_topk_prob": self.norm_topk_prob, "attention_bias": False}
        if family == "deepseek_v2":
            method = "group_limited_greedy" if self.router_groups > 1 else "greedy"
            return {**deepseek, "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
                    "topk_method": method, "mlp_bias": False}
        return {**deepseek, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}

    def _refuse_unbuildable(self) -> None:
        """ValueError naming the first feature this family's transformers class cannot build."""
        family, name = self.family, self.name
        gemma = family in ("gemma2", "gemma3")

        def refuse(feature: str) -> None:
            raise ValueError(f"{name}: {feature} cannot be built by the {family!r} family's transformers model")

        if self.qk_norm != (family in ("qwen3", "gemma3", "qwen3_moe")):
            refuse(f"qk_norm={self.qk_norm}")
        if (self.norms_per_layer == 4) != gemma:
            refuse(f"norms_per_layer={self.norms_per_layer}")
        if gemma and self.mlp_activation != "gelu_tanh":
            refuse(f"mlp_activation={self.mlp_activation!r}")
        expected_multiplier = self.hidden_size**0.5 if gemma else 1.0  # Gemma*TextScaledWordEmbedding
        if abs(self.embedding_multiplier - expected_multiplier) > 1e-4 * expected_multiplier:
            refuse(f"embedding_multiplier={self.embedding_multiplier} (builds {expected_multiplier:.6g})")
        if self.final_logit_softcapping is not None and not gemma:
            refuse(f"final_logit_softcapping={self.final_logit_softcapping}")
        if self.attn_logit_softcapping is not None and family != "gemma2":
            refuse(f"attn_logit_softcapping={self.attn_logit_softcapping}")
        if self.query_pre_attn_scalar not in (None, float(self.head_size)) and not gemma:
            refuse(f"query_pre_attn_scalar={self.query_pre_attn_scalar}")
        if (self.fused_qkv, self.fused_gate_up) != ((True, True) if family == "phi3" else (False, False)):
            refuse(f"fused_qkv={self.fused_qkv}, fused_gate_up={self.fused_gate_up}")
        if self.attention_bias and family not in ("llama", "qwen2", "internlm2", "generic", "qwen2_moe"):
            refuse("attention_bias=True")
        if self.is_moe != (family in MOE_FAMILIES):
            refuse(f"num_experts={self.num_experts}")
        if self.is_mla != (family in ("deepseek_v2", "deepseek_v3")):
            refuse(f"kv_lora_rank={self.kv_lora_rank}")
        if self.router_scoring != ("sigmoid" if family == "deepseek_v3" else "softmax"):
            refuse(f"router_scoring={self.router_scoring!r}")
        if self.num_shared_experts and family not in ("deepseek_v2", "deepseek_v3", "qwen2_moe"):
            refuse(f"num_shared_experts={self.num_shared_experts}")
        if self.shared_expert_intermediate_size and family != "qwen2_moe":
            refuse(f"shared_expert_intermediate_size={self.shared_expert_intermediate_size}")
        if self.is_moe and self.sliding_window and family != "mixtral":
            refuse(f"sliding_window={self.sliding_window}")

    def _int_query_pre_attn_scalar(self) -> int:
        """query_pre_attn_scalar as Gemma2Config/Gemma3TextConfig type it (int); head_size if unset."""
        value = self.query_pre_attn_scalar or self.head_size
        if value != int(value):
            raise ValueError(f"{self.name}: query_pre_attn_scalar ({value}) must be a whole number for transformers")
        return int(value)

    def _one_window(self, local: list[bool]) -> int | None:
        """The single sliding window of a family that applies it to every layer (mistral, phi3)."""
        if not any(local):
            return None
        if not all(local):
            raise ValueError(f"{self.name}: family {self.family!r} applies sliding_window to every layer or none "
                             f"(got {sum(local)} local layers of {len(local)})")
        return self.sliding_window


class GpuProfile(BaseModel):
    """One accelerator kind, with the numbers the planner needs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    display_name: str
    source: str
    hbm_bytes: int = Field(gt=0, description="memory as the CUDA runtime reports it (total, not marketed)")
    bf16_tflops: float = Field(ge=0, description="dense peak; 0 when the chip has no bf16")
    fp16_tflops: float = Field(gt=0, description="dense peak")
    fp32_tflops: float = Field(
        gt=0, description="dense fp32 peak without TF32 (PyTorch runs fp32 matmuls so by default)"
    )
    hbm_bandwidth_bytes_per_s: float = Field(gt=0)
    intra_node_bandwidth_bytes_per_s: float = Field(gt=0, description="per GPU, one direction, to its node peers")
    gpus_per_node: int = Field(gt=0)
    inter_node_bandwidth_bytes_per_s: float = Field(gt=0, description="per GPU, one direction, across nodes")
    host_link_bandwidth_bytes_per_s: float = Field(gt=0, description="GPU to host memory (PCIe), one direction")
    host_mem_bytes_per_node: int = Field(gt=0, description="default host memory of one node")
    matmul_efficiency: float = Field(
        gt=0, le=1, description="achievable fraction of peak for large bf16 matmuls (stas00 MAMF)"
    )
    flash_attention_tflops: float = Field(
        gt=0, allow_inf_nan=False,
        description="FlashAttention-2 forward+backward rate, causal, head dim 128, 16k tokens, in the "
        "kernel benchmark's FLOPs convention (backward = 2.5x forward); published for A100 and H100 "
        "(flash-attention README), scaled by peak for other chips (the source says which)",
    )
    cuda_context_bytes: int = Field(ge=0, description="CUDA context and kernels loaded (0 for cpu)")
    comm_buffer_bytes: int = Field(ge=0, description="NCCL communicator buffers per process group (0 for cpu)")

    @property
    def supports_bf16(self) -> bool:
        return self.bf16_tflops > 0

    def peak_flops(self, precision: str) -> float:
        tflops = {"bf16": self.bf16_tflops, "fp16": self.fp16_tflops, "fp32": self.fp32_tflops}[precision]
        return tflops * 1e12
