"""Command-line layout options, validated at the edge and turned into a search request."""

from __future__ import annotations

from ..profiles import GIB, load_gpu, resolve_model
from .schema import check_sp_degree
from .search import Pins, Request

_CHOICES = {
    "offload": ("none", "optimizer", "all"),
    "loss": ("full", "chunked"),
    "recompute": ("full", "none"),
    "attention": ("varlen", "eager"),
    "precision": ("bf16", "fp16", "fp32"),
}


def request_from_options(model, ctx, gpu, gpus, zero_stage, sp_degree, offload, loss, recompute, micro_batch,
                         attention, precision, chunk_tokens, max_gpus=1024, safety_margin=None, host_mem_gib=None):
    """Validate the layout options (ValueError/ProfileError with the key and numbers) and
    turn them into a search request."""
    given = {"offload": offload, "loss": loss, "recompute": recompute, "attention": attention, "precision": precision}
    for key, value in given.items():
        if value is not None and value not in _CHOICES[key]:
            raise ValueError(f"--{key} must be one of {', '.join(_CHOICES[key])} (got '{value}')")
    arch = resolve_model(model)
    gpu_profile = load_gpu(gpu)
    if precision is None:
        precision = "bf16" if gpu_profile.supports_bf16 else "fp16"
    elif precision == "bf16" and not gpu_profile.supports_bf16:
        raise ValueError(f"{gpu_profile.name} has no bf16; use --precision fp16")
    per_node = gpu_profile.gpus_per_node
    if gpus is not None and gpus > per_node and gpus % per_node:
        raise ValueError(f"--gpus ({gpus}) must be a multiple of the GPUs per node ({per_node}) of {gpu_profile.name}")
    if sp_degree is not None:
        check_sp_degree(sp_degree, arch)
        if gpus is not None and gpus % sp_degree:
            raise ValueError(f"sp_degree ({sp_degree}) must divide --gpus ({gpus})")
    pins = Pins(num_gpus=gpus, zero_stage=zero_stage, sp_degree=sp_degree, micro_batch_size=micro_batch,
                offload=offload, recompute=recompute, loss=loss, attention=attention, max_gpus=max_gpus)
    extra = {} if safety_margin is None else {"safety_margin": safety_margin}
    return Request(model=arch, gpu=gpu_profile, seq_len=ctx, precision=precision, chunk_tokens=chunk_tokens,
                   host_mem_bytes=int(host_mem_gib * GIB) if host_mem_gib is not None else None, pins=pins, **extra)
