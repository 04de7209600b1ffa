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


class ModelProfile(BaseModel):
    """A decoder-only transformer's architecture, as its config.json publishes it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Label
    source: str = Field(description="where the numbers come from (the config.json it copies)")
    family: Literal["llama", "internlm2", "qwen2", "mistral", "generic"]
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

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_size

    def layer_params(self) -> int:
        """Parameters of one decoder layer: attention, gated MLP, two RMSNorms."""
        h = self.hidden_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = 3 * h * self.intermediate_size
        return attn + mlp + 2 * h

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def num_params(self) -> int:
        """All parameters: embeddings, layers, final norm and (untied) output head."""
        return (
            self.embedding_params()
            + self.num_layers * self.layer_params()
            + self.hidden_size
            + self.lm_head_params()
        )

    def largest_tensor_params(self) -> int:
        """The biggest single parameter tensor (the embedding, or an MLP matrix)."""
        return max(self.embedding_params(), self.hidden_size * self.intermediate_size)

    def to_hf_config(self) -> dict:
        """A transformers config dict (Llama, or Qwen2 for q/k/v biases) that builds this architecture."""
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
            "hidden_act": "silu",
        }
        if self.family == "qwen2":
            # Llama's attention_bias also puts a bias on o_proj; Qwen2 biases q/k/v only.
            cfg = {**cfg, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
            cfg.pop("attention_bias")
        return cfg


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
