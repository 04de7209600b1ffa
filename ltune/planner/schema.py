"""The planner's frozen results and the plan.yaml schema (pydantic v2, pure Python)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ..profiles.schema import CONTROL_CHARACTERS, Label, ModelProfile, one_printable_line  # noqa: F401 (re-exported)

SCHEMA_VERSION = 1

# Upper bounds far above any real job; they keep a plan's arithmetic finite and fast.
#: GPUs of one job: 4x the largest published training run (Llama 3: 16,384 H100s, arXiv:2407.21783)
MAX_GPUS = 2**16
#: the cpu target runs every process on this one machine (its 'nodes' are simulated on it)
CPU_TARGET = "cpu"
#: processes the cpu target starts at most: one machine, each process a whole Python runtime
CPU_MAX_PROCESSES = 64
#: tokens per sequence: over 10x the longest published context (Llama 4 Scout, 10M tokens)
MAX_SEQ_LEN = 2**27
#: packed sequences per GPU per step, micro-batches per optimizer step
MAX_BATCH = 2**16
#: steps, epochs and intervals in steps
MAX_STEPS = 10**9
#: host memory of one node, GiB (1 PiB)
MAX_HOST_MEM_GIB = 2**20

#: a string that reaches a path, a shell script or a process: one line, printable
PathStr = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(one_printable_line)]

#: a GPU profile name, lower case as the profiles are (`CPU` is the cpu target too)
GpuName = Annotated[Label, AfterValidator(str.lower)]

Offload = Literal["none", "optimizer", "all"]
Recompute = Literal["full", "none"]
LossMode = Literal["full", "chunked"]
Attention = Literal["varlen", "eager"]
Precision = Literal["bf16", "fp16", "fp32"]
ZeroStage = Literal[0, 1, 2, 3]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Layout(_Frozen):
    """How one job is laid out over its GPUs."""

    num_gpus: int = Field(gt=0, le=MAX_GPUS, description="GPUs of the job, over all its nodes")
    zero_stage: ZeroStage = Field(
        default=3,
        description="DeepSpeed ZeRO stage: 0 keeps whole model states on every GPU; 1 shards the optimizer "
        "states over the GPUs, 2 the gradients too, 3 the weights too",
    )
    sp_degree: int = Field(
        default=1, gt=0, le=MAX_GPUS,
        description="Ulysses sequence-parallel degree; divides the attention heads and num_gpus",
    )
    micro_batch_size: int = Field(default=1, gt=0, le=MAX_BATCH, description="packed sequences per GPU per step")
    offload: Offload = Field(
        default="none",
        description="what lives in host memory: nothing; the optimizer (fp32 master weights and Adam moments, "
        "updated by DeepSpeed's CPU Adam; ZeRO 1-3); or all (the weights too; ZeRO-3)",
    )
    recompute: Recompute = Field(
        default="full",
        description="gradient checkpointing: full keeps each layer's input and re-runs its forward in the "
        "backward; none keeps every activation",
    )
    loss: LossMode = Field(
        default="full",
        description="cross-entropy: full makes the fp32 logits of every token at once; chunked makes them "
        "loss_chunk_tokens at a time and never holds them all",
    )
    attention: Attention = Field(
        default="varlen",
        description="varlen: flash-attention over the packed documents (memory linear in seq_len); eager: "
        "the attention matrix in memory (quadratic)",
    )

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
    throughput: Throughput = Field(description="one optimizer step of gradient_accumulation_steps micro-batches")
    gradient_accumulation_steps: int = Field(default=1, gt=0, le=MAX_BATCH, description="micro-batches per optimizer step")

    @property
    def fits(self) -> bool:
        return self.memory.fits

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step: micro_batch_size x gradient_accumulation_steps x dp_degree."""
        return self.layout.micro_batch_size * self.gradient_accumulation_steps * self.layout.dp_degree

    @property
    def gpu_hours_per_million_tokens(self) -> float:
        """What a million trained tokens cost: 1e6 / (tokens/s/GPU x 3600 s/h)."""
        return 1e6 / (self.throughput.tokens_per_s_per_gpu * 3600)


class Hardware(_Frozen):
    gpu: GpuName = Field(description="GPU profile name (ltune gpus)")
    num_nodes: int = Field(
        default=1, gt=0, le=MAX_GPUS, description="nodes, each with the GPU profile's gpus_per_node GPUs"
    )
    host_mem_gib: float | None = Field(
        default=None, gt=0, le=MAX_HOST_MEM_GIB,
        description="host memory per node for offload, GiB; the GPU profile's if unset",
    )
    storage_write_bytes_per_s: float | None = Field(
        default=None, ge=1, le=1e15,
        description="checkpoint write bandwidth of one node to the shared file system, bytes/s; "
        "2e9 if unset (ltune/planner/checkpointing.py DEFAULT_STORAGE_WRITE_BYTES_PER_S)",
    )
    cpus_per_node: int | None = Field(
        default=None, gt=0, le=2**16,
        description="CPU cores of one node for the job (slurm --cpus-per-task, OMP_NUM_THREADS = cores / processes); "
        "unset: local launches count this machine's cores, slurm asks 8 per GPU process",
    )


class ModelSpec(_Frozen):
    name: PathStr = Field(description="what --model was given: a profile name, a config.json path or a size")
    architecture: ModelProfile
    path: PathStr | None = Field(
        default=None, description="local HF model folder (safetensors); random init if unset"
    )
    tokenizer: PathStr | None = Field(default=None, description="local tokenizer folder; the model folder if unset")
    trust_remote_code: bool = Field(default=False, description="let transformers run the model folder's own code")


#: an AdamW beta: a decay rate in [0, 1) (Kingma & Ba 2015, Algorithm 1)
Beta = Annotated[float, Field(ge=0, lt=1)]


class Training(_Frozen):
    seq_len: int = Field(gt=0, le=MAX_SEQ_LEN, description="tokens per packed sequence (the context length)")
    learning_rate: float = Field(
        default=2e-5, gt=0, le=1,
        description="AdamW peak learning rate: linear warmup to it, then cosine decay to 0",
    )
    betas: tuple[Beta, Beta] = Field(default=(0.9, 0.95), description="AdamW (beta1, beta2), each in [0, 1)")
    weight_decay: float = Field(
        default=0.0, ge=0, le=1,
        description="AdamW weight decay, on parameters of two or more dimensions (not norms or biases)",
    )
    warmup_steps: int = Field(
        default=0, ge=0, le=MAX_STEPS, description="optimizer steps of linear learning-rate warmup"
    )
    max_grad_norm: float = Field(default=1.0, gt=0, description="gradients are clipped to this global L2 norm")
    precision: Precision = Field(
        default="bf16",
        description="bf16 or fp16: 16-bit weights, gradients and activations with an fp32 master copy (fp16 "
        "with dynamic loss scaling); fp32: full precision, no mixed precision",
    )
    max_steps: int | None = Field(
        default=None, gt=0, le=MAX_STEPS, description="optimizer steps to run; epochs decides if unset"
    )
    epochs: int | None = Field(
        default=None, gt=0, le=MAX_STEPS, description="passes over the packed data, when max_steps is unset"
    )
    gradient_accumulation_steps: int = Field(
        default=1, gt=0, le=MAX_BATCH, description="micro-batches per optimizer step"
    )
    data: list[PathStr] = Field(default_factory=list, max_length=100_000, description="JSONL files or folders of them")
    output_dir: PathStr = Field(
        default="runs/ltune", description="run folder (checkpoints, logs, metrics); ltune launch --run-dir overrides it"
    )
    seed: int = Field(
        default=0, ge=0, lt=2**32,
        description="seeds the random initialisation and each epoch's shuffle of the documents",
    )
    checkpoint_every: int | None = Field(
        default=None, ge=0, le=MAX_STEPS,
        description="steps between checkpoints; 0: only at the end; unset: every checkpoint_minutes of predicted work",
    )
    checkpoint_minutes: float = Field(
        default=30, gt=0, le=10**6,
        description="when checkpoint_every is unset: a checkpoint at least every this many minutes of work, "
        "counted in steps of the predicted step time",
    )
    keep_last: int = Field(
        default=2, ge=0, le=MAX_STEPS,
        description="complete checkpoints kept: older ones are removed once a new one is complete; 0 keeps all",
    )
    log_every: int = Field(default=1, gt=0, le=MAX_STEPS, description="steps between printed log lines")
    loss_chunk_tokens: int = Field(
        default=4096, gt=0, le=MAX_SEQ_LEN, description="tokens per chunk of the chunked loss"
    )
    collective_timeout_minutes: float = Field(
        default=30, gt=0, le=10**4,
        description="longest any rank waits in a collective (the process group's timeout) before the job fails: "
        "data preparation (ranks tokenize their shares of the corpus, then wait for the slowest), checkpoint "
        "saves and every step",
    )

    @model_validator(mode="after")
    def _check(self) -> "Training":
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set max_steps or epochs")
        return self


MethodKind = Literal["full", "lora", "qlora"]
QuantType = Literal["nf4", "fp4"]
QuantStorage = Literal["uint8", "bf16"]
#: a linear layer's module name inside a decoder layer (q_proj, gate_up_proj, ...)
ModuleName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class Method(_Frozen):
    """What is trained: every parameter, or low-rank adapters beside frozen weights (LoRA, Hu et
    al. 2021), the frozen weights stored in 4 bits (QLoRA, Dettmers et al. 2023)."""

    kind: MethodKind = Field(
        default="full",
        description="full: every parameter trains (AdamW on all); lora: rank-r adapters (peft) on frozen "
        "weights in the model dtype; qlora: the same adapters on weights frozen in 4 bits (bitsandbytes, CUDA only)",
    )
    lora_rank: int = Field(default=16, gt=0, le=2**16, description="LoRA rank r: each adapter adds r x (in + out) parameters")
    lora_alpha: float = Field(default=32, gt=0, le=2**20, description="LoRA alpha: the adapter's output is scaled by alpha / r")
    lora_dropout: float = Field(
        default=0.0, ge=0, lt=1, description="dropout on each adapter's input (0: none, and no saved mask)"
    )
    lora_targets: tuple[ModuleName, ...] | None = Field(
        default=None, max_length=64,
        description="linear layers of each decoder layer that get an adapter, by module name (q_proj, v_proj, ...); "
        "unset: every one of them",
    )
    quant_type: QuantType = Field(default="nf4", description="qlora: 4-bit data type of the frozen weights")
    double_quant: bool = Field(
        default=True, description="qlora: quantize the quantization constants too (0.127 instead of 0.5 bits per weight)"
    )
    quant_storage: QuantStorage = Field(
        default="uint8", description="qlora: dtype of the tensors that hold the packed 4-bit values (same bytes)"
    )
    export_merged: bool = Field(
        default=False,
        description="lora/qlora: the export writes the base model with the adapters merged into it, beside the "
        "adapter folder",
    )

    @property
    def adapters(self) -> bool:
        """LoRA or QLoRA: frozen base weights, trainable adapters."""
        return self.kind != "full"


class CheckpointPrediction(_Frozen):
    """What one checkpoint costs and how often the job saves (ltune/planner/checkpointing.py)."""

    total_bytes: int = Field(ge=0, description="every rank's DeepSpeed files together")
    max_rank_bytes: int = Field(ge=0, description="what the busiest rank writes")
    max_node_bytes: int = Field(ge=0, description="what the busiest node writes")
    storage_write_bytes_per_s: float = Field(gt=0, description="one node's write bandwidth assumed")
    save_time_s: float = Field(ge=0, description="max_node_bytes / storage_write_bytes_per_s")
    every_steps: int = Field(ge=0, description="steps between checkpoints; 0: only at the end")
    stop_grace_s: int = Field(gt=0, description="time a stop signal leaves the job to finish its step and save")


class Prediction(_Frozen):
    memory: MemoryBreakdown
    throughput: Throughput
    safety_margin: float = Field(ge=0, le=0.5)
    checkpoint: CheckpointPrediction | None = None


class Plan(_Frozen):
    """plan.yaml: everything `ltune launch` needs to run exactly the planned job."""

    schema_version: Literal[1] = SCHEMA_VERSION
    model: ModelSpec
    hardware: Hardware
    layout: Layout
    training: Training
    method: Method = Field(default_factory=Method, description="what is trained: all weights, or LoRA/QLoRA adapters")
    prediction: Prediction | None = None

    @model_validator(mode="after")
    def _check(self) -> "Plan":
        check_sp_degree(self.layout.sp_degree, self.model.architecture)
        check_method(self.method, self.model.architecture, self.layout.zero_stage)
        if self.hardware.gpu == CPU_TARGET:
            check_cpu_processes(self.layout.num_gpus, "layout.num_gpus")
        return self


def check_cpu_processes(num_gpus: int, flag: str) -> None:
    """The cpu target starts one process per device, all on this machine: at most CPU_MAX_PROCESSES."""
    if num_gpus > CPU_MAX_PROCESSES:
        raise ValueError(
            f"{flag} ({num_gpus}) is more processes than the cpu target runs on one machine ({CPU_MAX_PROCESSES})"
        )


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


def check_method(method: Method, arch: ModelProfile, zero_stage: int | None = None) -> None:
    """The adapters' targets name linear layers of this model's decoder; QLoRA runs at ZeRO 0-2
    (bitsandbytes' 4-bit tensors are not partitioned by ZeRO-3 in ltune's trainer)."""
    from .lora import target_modules

    if not method.adapters:
        return
    target_modules(arch, method)
    if method.kind == "qlora" and zero_stage == 3:
        raise ValueError("method qlora needs zero_stage 0, 1 or 2 (got 3): ltune keeps the 4-bit weights whole on "
                         "every GPU and shards only the adapters' optimizer states")
