"""The planner's frozen results and the plan.yaml schema (pydantic v2, pure Python)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..profiles.schema import ModelProfile

SCHEMA_VERSION = 1

Offload = Literal["none", "optimizer", "all"]
Recompute = Literal["full", "none"]
LossMode = Literal["full", "chunked"]
Attention = Literal["varlen", "eager"]
Precision = Literal["bf16", "fp16", "fp32"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Layout(_Frozen):
    """How one job is laid out over its GPUs."""

    num_gpus: int = Field(gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 3
    sp_degree: int = Field(default=1, gt=0, description="Ulysses sequence-parallel degree")
    micro_batch_size: int = Field(default=1, gt=0, description="packed sequences per GPU per step")
    offload: Offload = "none"
    recompute: Recompute = "full"
    loss: LossMode = "full"
    attention: Attention = "varlen"

    @model_validator(mode="after")
    def _check(self) -> "Layout":
        if self.num_gpus % self.sp_degree:
            raise ValueError(f"sp_degree ({self.sp_degree}) must divide num_gpus ({self.num_gpus})")
        if self.offload == "optimizer" and self.zero_stage == 0:
            raise ValueError("offload 'optimizer' needs zero_stage 1, 2 or 3 (got 0)")
        if self.offload == "all" and self.zero_stage != 3:
            raise ValueError(f"offload 'all' (parameters too) needs zero_stage 3 (got {self.zero_stage})")
        return self

    @property
    def dp_degree(self) -> int:
        return self.num_gpus // self.sp_degree


class MemoryBreakdown(_Frozen):
    """Per-GPU memory by term, in bytes, and what the GPU holds."""

    terms: dict[str, int]
    total_bytes: int
    capacity_bytes: int
    usable_bytes: int = Field(description="capacity less the safety margin")
    host_bytes_per_node: int = 0
    host_capacity_bytes_per_node: int = 0
    peak_phase: str = Field(default="backward", description="the moment of the step the terms describe")

    @property
    def fits_gpu(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    @property
    def fits_host(self) -> bool:
        return self.host_bytes_per_node <= self.host_capacity_bytes_per_node

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host


class Throughput(_Frozen):
    """Predicted step time and what it means per GPU."""

    step_time_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    compute_s: float
    exposed_comm_s: float
    flops_per_token: float


class Evaluation(_Frozen):
    """One candidate layout, judged."""

    layout: Layout
    memory: MemoryBreakdown
    throughput: Throughput

    @property
    def fits(self) -> bool:
        return self.memory.fits


class Hardware(_Frozen):
    gpu: str = Field(description="GPU profile name")
    num_nodes: int = Field(default=1, gt=0)
    host_mem_gib: float | None = Field(default=None, gt=0, description="per node; the GPU profile's default if unset")


class ModelSpec(_Frozen):
    name: str = Field(description="what --model was given: a profile name, a config.json path or a size")
    architecture: ModelProfile
    path: str | None = Field(default=None, description="local HF model folder (safetensors); random init if unset")
    tokenizer: str | None = Field(default=None, description="local tokenizer folder; the model folder if unset")
    trust_remote_code: bool = False


class Training(_Frozen):
    seq_len: int = Field(gt=0, description="tokens per packed sequence (the context length)")
    learning_rate: float = Field(default=2e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    precision: Precision = "bf16"
    max_steps: int | None = Field(default=None, gt=0)
    epochs: int | None = Field(default=None, gt=0)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    data: list[str] = Field(default_factory=list, description="JSONL files or folders of them")
    output_dir: str = "runs/ltune"
    seed: int = 0
    checkpoint_every: int = Field(default=0, ge=0, description="steps between checkpoints; 0: only at the end")
    log_every: int = Field(default=1, gt=0)
    loss_chunk_tokens: int = Field(default=4096, gt=0, description="tokens per chunk of the chunked loss")

    @model_validator(mode="after")
    def _check(self) -> "Training":
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set max_steps or epochs")
        return self


class Prediction(_Frozen):
    memory: MemoryBreakdown
    throughput: Throughput
    safety_margin: float


class Plan(_Frozen):
    """plan.yaml: everything `ltune launch` needs to run exactly the planned job."""

    schema_version: Literal[1] = SCHEMA_VERSION
    model: ModelSpec
    hardware: Hardware
    layout: Layout
    training: Training
    prediction: Prediction | None = None

    @model_validator(mode="after")
    def _check(self) -> "Plan":
        check_sp_degree(self.layout.sp_degree, self.model.architecture)
        return self


def check_sp_degree(sp_degree: int, arch: ModelProfile) -> None:
    """Ulysses scatters attention heads over the sp group: the degree must divide them."""
    if arch.num_attention_heads % sp_degree:
        raise ValueError(
            f"sp_degree ({sp_degree}) must divide num_attention_heads ({arch.num_attention_heads})"
        )
    kv = arch.num_kv_heads
    if kv % sp_degree and sp_degree % kv:
        raise ValueError(
            f"sp_degree ({sp_degree}) must divide num_kv_heads ({kv}) or be a multiple of it"
        )
