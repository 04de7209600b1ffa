"""The layout options `ltune plan` and `ltune trace` share: one frozen model, validated at
the edge (its Literal types are the plan schema's) and turned into a search request."""

from __future__ import annotations

from typing import Annotated, Literal, get_args, get_origin

from pydantic import Field, ValidationError

from ..profiles import GIB, load_gpu_option, resolve_model
from ..profiles.schema import Label
from .memory import SAFETY_MARGIN
from .schema import (
    CPU_MAX_PROCESSES,
    CPU_TARGET,
    MAX_BATCH,
    MAX_GPUS,
    MAX_HOST_MEM_GIB,
    MAX_SEQ_LEN,
    Attention,
    PathStr,
    Hardware,
    Layout,
    LossMode,
    Method,
    MethodKind,
    Offload,
    Precision,
    Recompute,
    Training,
    ZeroStage,
    _Frozen,
    check_cpu_processes,
    check_method,
    check_sp_degree,
)
from .io import short_repr
from .search import (
    DEFAULT_TOKENS_PER_STEP,
    MAX_GLOBAL_BATCH,
    PREFER_HELP,
    Pins,
    Prefer,
    Request,
)


def _described(model: type[_Frozen], field: str) -> str:
    """A plan-schema field's description, so options, --help and `ltune schema` say the same."""
    return model.model_fields[field].description


def _method_type(field: str):
    """A Method field's type with its limits (planner/schema.py), optional: None leaves Method's default."""
    f = Method.model_fields[field]
    return Annotated[f.annotation, *f.metadata] | None if f.metadata else f.annotation | None


def _method_help(field: str) -> str:
    """A Method field's description with its default, for an option left None by default."""
    f = Method.model_fields[field]
    default = f.default
    if field == "lora_targets":
        return f"{f.description}; comma-separated (q_proj,v_proj)"
    shown = str(default).lower() if isinstance(default, bool) else f"{default:g}" if isinstance(default, float) else default
    return f"{f.description} (default {shown})"


LoraRank = _method_type("lora_rank")
LoraAlpha = _method_type("lora_alpha")
LoraDropout = _method_type("lora_dropout")
LoraTargets = _method_type("lora_targets")
QuantTypeOpt = _method_type("quant_type")
DoubleQuant = _method_type("double_quant")
QuantStorageOpt = _method_type("quant_storage")
ExportMerged = _method_type("export_merged")
#: the options of each method beyond `full`: lora's apply to lora and qlora, qlora's to qlora only
LORA_OPTIONS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "export_merged")
QLORA_OPTIONS = ("quant_type", "double_quant", "quant_storage")


class LayoutOptions(_Frozen):
    """What `ltune plan` and `ltune trace` are asked; a None layout field is left to the search."""

    model: PathStr = Field(description="profile name (ltune models), a HF config.json or its folder, or a size like 7b")
    seq_len: int = Field(gt=0, le=MAX_SEQ_LEN, description=_described(Training, "seq_len"))
    gpu: Label = Field(default="a100-80g", description=_described(Hardware, "gpu"))
    num_gpus: int | None = Field(default=None, gt=0, le=MAX_GPUS, description=_described(Layout, "num_gpus"))
    max_gpus: int = Field(default=1024, gt=0, le=MAX_GPUS, description="largest GPU count searched")
    zero_stage: ZeroStage | None = Field(default=None, description=_described(Layout, "zero_stage"))
    sp_degree: int | None = Field(default=None, gt=0, le=MAX_GPUS, description=_described(Layout, "sp_degree"))
    micro_batch_size: int | None = Field(
        default=None, gt=0, le=MAX_BATCH, description=_described(Layout, "micro_batch_size")
    )
    offload: Offload | None = Field(default=None, description=_described(Layout, "offload"))
    recompute: Recompute | None = Field(default=None, description=_described(Layout, "recompute"))
    loss: LossMode | None = Field(default=None, description=_described(Layout, "loss"))
    attention: Attention = Field(default="varlen", description=_described(Layout, "attention"))
    precision: Precision | None = Field(
        default=None,
        description=_described(Training, "precision") + " (default bf16, fp16 where the GPU has no bf16)",
    )
    loss_chunk_tokens: int = Field(
        default=4096, gt=0, le=MAX_SEQ_LEN, description=_described(Training, "loss_chunk_tokens")
    )
    safety_margin: float = Field(default=SAFETY_MARGIN, ge=0, le=0.5, description="fraction of GPU memory kept free")
    host_mem_gib: float | None = Field(
        default=None, ge=0, le=MAX_HOST_MEM_GIB, description=_described(Hardware, "host_mem_gib")
    )
    global_batch: int | None = Field(
        default=None, gt=0, le=MAX_GLOBAL_BATCH,
        description="sequences per optimizer step (micro-batch x accumulation x data-parallel degree), the same "
        "for every layout searched; layouts that cannot reach it exactly are skipped",
    )
    tokens_per_step: int | None = Field(
        default=None, gt=0, le=MAX_GLOBAL_BATCH * MAX_SEQ_LEN,
        description=f"tokens per optimizer step instead: ceil(tokens / ctx) sequences rounded up to a power of two "
        f"(default {DEFAULT_TOKENS_PER_STEP:,} = 4Mi, Llama 2's batch, kept by its long-context continual "
        "pretraining)",
    )
    doc_tokens: int | None = Field(
        default=None, gt=0, le=MAX_SEQ_LEN,
        description="mean document length packed into each sequence, tokens: varlen attention costs per document "
        "(default: one document fills the sequence)",
    )
    prefer: Prefer = Field(
        default="fewest", description="; ".join(f"{k}: {v}" for k, v in PREFER_HELP.items())
    )
    # what trains (planner/schema.py Method); None: Method's default
    method: MethodKind = Field(default="full", description=_described(Method, "kind"))
    lora_rank: LoraRank = Field(default=None, description=_method_help("lora_rank"))
    lora_alpha: LoraAlpha = Field(default=None, description=_method_help("lora_alpha"))
    lora_dropout: LoraDropout = Field(default=None, description=_method_help("lora_dropout"))
    lora_targets: LoraTargets = Field(default=None, description=_method_help("lora_targets"))
    quant_type: QuantTypeOpt = Field(default=None, description=_method_help("quant_type"))
    double_quant: DoubleQuant = Field(default=None, description=_method_help("double_quant"))
    quant_storage: QuantStorageOpt = Field(default=None, description=_method_help("quant_storage"))
    export_merged: ExportMerged = Field(default=None, description=_method_help("export_merged"))


#: the command-line flag of each option (the field name where they differ: --ctx is seq_len)
CLI_FLAGS = {
    "model": "--model", "seq_len": "--ctx", "gpu": "--gpu", "num_gpus": "--gpus", "max_gpus": "--max-gpus",
    "zero_stage": "--zero-stage", "sp_degree": "--sp-degree", "micro_batch_size": "--micro-batch",
    "offload": "--offload", "recompute": "--recompute", "loss": "--loss", "attention": "--attention",
    "precision": "--precision", "loss_chunk_tokens": "--loss-chunk-tokens", "safety_margin": "--safety-margin",
    "host_mem_gib": "--host-mem-gib", "global_batch": "--global-batch", "tokens_per_step": "--tokens-per-step",
    "prefer": "--prefer", "doc_tokens": "--doc-tokens",
    "method": "--method", "lora_rank": "--lora-rank", "lora_alpha": "--lora-alpha", "lora_dropout": "--lora-dropout",
    "lora_targets": "--lora-targets", "quant_type": "--quant-type", "double_quant": "--double-quant/--no-double-quant",
    "quant_storage": "--quant-storage", "export_merged": "--export-merged",
}
#: defaults of the optional options, for the command line's signatures
DEFAULTS = {name: f.default for name, f in LayoutOptions.model_fields.items() if not f.is_required()}


def choices(field: str) -> tuple:
    """The values a Literal-typed option takes (empty for other options)."""
    annotation = LayoutOptions.model_fields[field].annotation
    for arg in (annotation, *get_args(annotation)):
        if get_origin(arg) is Literal:
            return get_args(arg)
    return ()


def layout_options(**given) -> LayoutOptions:
    """The options as given on the command line, or a one-line ValueError naming the flag:
    `--offload must be one of none, optimizer, all (got 'x')`."""
    try:
        return LayoutOptions(**given)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0])
        flag = CLI_FLAGS.get(field, field)
        if err["type"] == "literal_error":
            allowed = ", ".join(str(c) for c in choices(field))
            raise ValueError(f"{flag} must be one of {allowed} (got {short_repr(err['input'])})") from None
        message = err["msg"].removeprefix("Value error, ")
        raise ValueError(f"{flag}: {message} (got {short_repr(err.get('input'))})") from None


def parse_targets(text: str | None) -> tuple[str, ...] | None:
    """--lora-targets: comma-separated module names (`q_proj,v_proj`), in order, duplicates
    dropped; None when not given; a one-line ValueError when it names none."""
    if text is None:
        return None
    names = tuple(dict.fromkeys(n.strip() for n in str(text).split(",") if n.strip()))
    if not names:
        raise ValueError(f"--lora-targets: give one or more module names separated by commas, like q_proj,v_proj "
                         f"(got {short_repr(text)})")
    return names


def method_from_options(opts: LayoutOptions) -> Method:
    """The plan's Method from --method and its options; an option of another method is a
    one-line ValueError (`--quant-type applies to --method qlora (got --method lora)`)."""
    own = {"full": (), "lora": LORA_OPTIONS, "qlora": LORA_OPTIONS + QLORA_OPTIONS}[opts.method]
    for field in LORA_OPTIONS + QLORA_OPTIONS:
        if getattr(opts, field) is not None and field not in own:
            needs = "lora or qlora" if field in LORA_OPTIONS else "qlora"
            flag = CLI_FLAGS[field]
            if field == "double_quant":
                flag = "--double-quant" if opts.double_quant else "--no-double-quant"
            raise ValueError(f"{flag} applies to --method {needs} (got --method {opts.method})")
    given = {f: getattr(opts, f) for f in own if getattr(opts, f) is not None}
    return Method(kind=opts.method, **given)


def check_method_options(method: Method, arch, opts: LayoutOptions) -> None:
    """schema.check_method with the flag named: an unknown --lora-targets name, or qlora with
    --zero-stage 3 (or --offload all, which needs ZeRO-3)."""
    try:
        check_method(method, arch, opts.zero_stage)
    except ValueError as e:
        message = str(e)
        if message.startswith("lora_targets: "):
            raise ValueError(f"--lora-targets: {message.removeprefix('lora_targets: ')}") from None
        raise ValueError(f"--zero-stage: {message}") from None
    if method.kind == "qlora" and opts.offload == "all":
        raise ValueError("--offload all needs zero_stage 3, which method qlora does not run at (ZeRO 0-2 only): "
                         "use --offload optimizer or none")


def request_from_options(opts: LayoutOptions) -> Request:
    """Check the options against the model and GPU (ValueError/ProfileError with the key
    and numbers) and turn them into a search request."""
    arch = resolve_model(opts.model)
    gpu_profile = load_gpu_option(opts.gpu)
    precision = opts.precision
    if precision is None:
        precision = "bf16" if gpu_profile.supports_bf16 else "fp16"
    elif precision == "bf16" and not gpu_profile.supports_bf16:
        raise ValueError(f"{gpu_profile.name} has no bf16; use --precision fp16")
    num_gpus, per_node = opts.num_gpus, gpu_profile.gpus_per_node
    max_gpus = opts.max_gpus
    if gpu_profile.name == CPU_TARGET:
        if num_gpus is not None:
            check_cpu_processes(num_gpus, "--gpus")
        max_gpus = min(max_gpus, CPU_MAX_PROCESSES)
    if num_gpus is not None and num_gpus > per_node and num_gpus % per_node:
        raise ValueError(
            f"--gpus ({num_gpus}) must be a multiple of the GPUs per node ({per_node}) of {gpu_profile.name}"
        )
    if opts.sp_degree is not None:
        check_sp_degree(opts.sp_degree, arch)
        if num_gpus is not None and num_gpus % opts.sp_degree:
            raise ValueError(f"sp_degree ({opts.sp_degree}) must divide --gpus ({num_gpus})")
    pins = Pins(num_gpus=num_gpus, zero_stage=opts.zero_stage, sp_degree=opts.sp_degree,
                micro_batch_size=opts.micro_batch_size, offload=opts.offload, recompute=opts.recompute,
                loss=opts.loss, attention=opts.attention, max_gpus=max_gpus)
    if opts.global_batch is not None and opts.tokens_per_step is not None:
        raise ValueError(
            f"--global-batch ({opts.global_batch}) and --tokens-per-step ({opts.tokens_per_step}): give one, not both"
        )
    method = method_from_options(opts)
    check_method_options(method, arch, opts)
    host_mem_bytes_per_node = int(opts.host_mem_gib * GIB) if opts.host_mem_gib is not None else None
    return Request(model=arch, gpu=gpu_profile, seq_len=opts.seq_len, precision=precision,
                   loss_chunk_tokens=opts.loss_chunk_tokens, safety_margin=opts.safety_margin,
                   host_mem_bytes_per_node=host_mem_bytes_per_node, global_batch=opts.global_batch,
                   tokens_per_step=opts.tokens_per_step, prefer=opts.prefer, doc_tokens=opts.doc_tokens,
                   pins=pins, method=method)


def parse_tokens(text: str) -> int:
    """A token count as people write it: an integer, or with a k (x 1,024) or m (x 1,048,576)
    suffix, any case (`8k`, `32K`, `1m`); else a one-line ValueError."""
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 1024, "m": 1024 * 1024}.get(s[-1:], 1)
    digits = s[:-1] if scale > 1 else s
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"{short_repr(text)} is not a token count (an integer, or with k = 1,024 or m = 1,048,576: 8k, 1m)")
    return int(digits) * scale


def parse_ctx(text: str, *, allow_max: bool = True) -> int | None:
    """--ctx: a number of tokens (parse_tokens: 4096, 8k, 1m; its upper bound is LayoutOptions'),
    or, with allow_max, `max` (None: find the longest context that fits, in multiples of
    CTX_GRANULARITY tokens); else a one-line ValueError."""
    if allow_max and text.strip().lower() == "max":
        return None
    try:
        tokens = parse_tokens(text)
    except ValueError as e:
        raise ValueError(f"Invalid value for '--ctx': {e}{', or ' + repr('max') if allow_max else ''}") from None
    if tokens < 1:
        raise ValueError(f"Invalid value for '--ctx': {tokens} is not in the range x>=1")
    return tokens
