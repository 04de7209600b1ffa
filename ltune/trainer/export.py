"""The end of a run: a Hugging Face model folder (safetensors) in RUN_DIR/hf_model.

The weights are streamed: the shards are laid out from the parameters' shapes (under
ZeRO-3 their ``ds_shape``), each shard's safetensors header is written first, then each
parameter is gathered (ZeRO-3: ``GatheredParameters``, every rank takes part), copied to
rank 0's host and written, one at a time. Rank 0's host holds one parameter, never the
model. Shards of at most MAX_SHARD_BYTES (a larger tensor gets a shard of its own) and,
when there are several, ``model.safetensors.index.json`` (transformers' sharded format);
tied weights are written once (the output head of a tied model is the embedding, as
``save_pretrained`` writes it). The folder is written under a temporary name and renamed.

Adapter runs (LoRA, QLoRA) write RUN_DIR/adapter instead: a peft adapter folder
(``adapter_model.safetensors`` with peft's key names, ``adapter_config.json`` from the plan's
LoraConfig) that ``peft.PeftModel.from_pretrained(base, folder)`` loads; and, when
method.export_merged, RUN_DIR/hf_model as above with each adapted weight merged (W + B A *
alpha / r, the 4-bit weights of QLoRA dequantized first) and the adapters left out. A merged
weight is computed from its gathered parameters as it is written (``Computed``): rank 0's host
still holds one tensor at a time.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
import torch.distributed as dist

#: the largest shard file: transformers' save_pretrained default is 50 GB; 2 GiB keeps files easy to move
MAX_SHARD_BYTES = 2 * 2**30

#: safetensors' dtype names (the format's specification)
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def export_tensors(lm: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What the folder holds: each parameter once (a tied one under its first name) and the
    persistent buffers, in module order."""
    out = list(lm.named_parameters())
    for prefix, module in lm.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                out.append((f"{prefix}.{name}" if prefix else name, buf))
    return out


class Computed:
    """A tensor of the export computed from parameters as it is written (a merged weight): its
    shape and dtype, the parameters it is made from (gathered together under ZeRO-3), and how."""

    def __init__(self, shape, dtype: torch.dtype, sources, fn) -> None:
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.sources = tuple(sources)
        self.fn = fn

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def value(self) -> torch.Tensor:
        out = self.fn(*self.sources)
        if tuple(out.shape) != tuple(self.shape) or out.dtype != self.dtype:
            raise RuntimeError(f"computed {tuple(out.shape)} {out.dtype}, laid out as {tuple(self.shape)} {self.dtype}")
        return out


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(t, "ds_shape", t.shape))


def _nbytes(t: torch.Tensor) -> int:
    n = 1
    for dim in _shape(t):
        n *= dim
    return n * t.element_size()


def plan_shards(tensors: list[tuple[str, torch.Tensor]], max_shard_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive tensors in shards of at most max_shard_bytes (a larger tensor alone)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive (got {max_shard_bytes})")
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in tensors:
        if shards[-1] and size + _nbytes(t) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += _nbytes(t)
    return shards if shards[0] else []


def safetensors_header(shard: list[tuple[str, torch.Tensor]]) -> bytes:
    """The 8-byte little-endian header size and the JSON header, padded with spaces to 8 bytes
    (the safetensors format), for tensors written in this order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    at = 0
    for name, t in shard:
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name")
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(_shape(t)), "data_offsets": [at, at + _nbytes(t)]}
        at += _nbytes(t)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _gathered(t: torch.Tensor):
    """A context giving the whole tensor (ZeRO-3 partitioned parameters gathered on every rank)."""
    params = [s for s in t.sources if hasattr(s, "ds_id")] if isinstance(t, Computed) else [t] * hasattr(t, "ds_id")
    if params:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    import contextlib

    return contextlib.nullcontext()


def write_shards(lm: torch.nn.Module, folder: Path | None, max_shard_bytes: int = MAX_SHARD_BYTES,
                 partitioned: bool = False, tensors: list | None = None, file_name: str = "model.safetensors") -> None:
    """The weights (``tensors``, by default ``export_tensors(lm)``) as safetensors shards in
    `folder` (rank 0; None elsewhere). Partitioned (ZeRO-3): every rank calls this, in the same
    order, for the gathers."""
    shards = plan_shards(export_tensors(lm) if tensors is None else tensors, max_shard_bytes)
    writer = folder is not None
    if not partitioned and not writer:
        return
    stem = file_name.removesuffix(".safetensors")
    names = [file_name] if len(shards) == 1 else [
        f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map, total = {}, 0
    for file_name, shard in zip(names, shards):
        f = open(folder / file_name, "wb") if writer else None
        try:
            if f is not None:
                f.write(safetensors_header(shard))
            for name, t in shard:
                with _gathered(t):
                    if f is not None:
                        value = t.value() if isinstance(t, Computed) else t
                        host = value.detach().to("cpu").contiguous().reshape(-1)
                        f.write(host.view(torch.uint8).numpy().data)
                        del host
                weight_map[name] = file_name
                total += _nbytes(t)
        finally:
            if f is not None:
                f.close()
    if writer and len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def merged_tensors(lm: torch.nn.Module, plan) -> list[tuple[str, torch.Tensor]]:
    """``export_tensors`` of a model with adapters, as the plain model with them merged: each
    adapted layer's weight W + B A * alpha / r (QLoRA: W dequantized) under the layer's own name
    (``.base_layer`` dropped), its bias as it is, the adapters left out; QLoRA's 4-bit layers
    without an adapter dequantized too."""
    from .lora import ADAPTER_NAME, dequantized, is_adapter, merged_weight, scaling

    scale = scaling(plan)
    out = []
    for name, t in export_tensors(lm):
        if is_adapter(name):
            continue
        if ".base_layer." not in name:
            if getattr(t, "quant_state", None) is not None:  # QLoRA: a 4-bit layer without an adapter
                owner = name.rpartition(".")[0]
                module = lm.get_submodule(owner)
                dtype = module.compute_dtype
                out.append((name, Computed((module.out_features, module.in_features), dtype, (t,),
                                           lambda w, dtype=dtype: dequantized(w).to(dtype))))
            else:
                out.append((name, t))
            continue
        owner, _, attr = name.partition(".base_layer.")
        layer = lm.get_submodule(owner)
        if attr != "weight" or ADAPTER_NAME not in layer.lora_A:
            out.append((f"{owner}.{attr}", t))
            continue
        base = layer.base_layer
        dtype = base.compute_dtype if getattr(t, "quant_state", None) is not None else t.dtype  # QLoRA: the model dtype

        def fn(w, a, b, dtype=dtype):
            return merged_weight(dequantized(w).to(dtype), a, b, scale)

        sources = (t, layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight)
        out.append((f"{owner}.weight", Computed((base.out_features, base.in_features), dtype, sources, fn)))
    return out


def export_adapter(engine, plan, run_dir: Path) -> Path | None:
    """The peft adapter folder RUN_DIR/adapter. All ranks call this; rank 0 writes and returns it."""
    from .lora import ADAPTER_WEIGHTS_FILE, adapter_tensors, lora_config

    rank = dist.get_rank()
    out = Path(run_dir) / "adapter"
    tmp = out.with_name("adapter.tmp")
    lm = engine.module.lm
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    # one file: peft reads no sharded adapter
    write_shards(lm, tmp if rank == 0 else None, 2**62, partitioned=plan.layout.zero_stage == 3,
                 tensors=adapter_tensors(lm), file_name=ADAPTER_WEIGHTS_FILE)
    if rank == 0:
        config = lora_config(plan, task_type="CAUSAL_LM", base_model_name_or_path=plan.model.path or plan.model.name)
        config.save_pretrained(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    dist.barrier()
    return out if rank == 0 else None


def export_hf_model(engine, plan, run_dir: Path, tokenizer=None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path | None:
    """All ranks call this; rank 0 writes and returns the folder (adapter runs: the merged model)."""
    rank = dist.get_rank()
    out = Path(run_dir) / "hf_model"
    tmp = out.with_name("hf_model.tmp")
    lm = engine.module.lm
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    tensors = merged_tensors(lm, plan) if plan.method.adapters else None
    write_shards(lm, tmp if rank == 0 else None, max_shard_bytes, partitioned=plan.layout.zero_stage == 3,
                 tensors=tensors)
    if rank == 0:
        lm.config.use_cache = True  # for inference; training set it off
        if lm.config.pad_token_id is None and tokenizer is not None and tokenizer.pad_token_id is not None:
            lm.config.pad_token_id = tokenizer.pad_token_id
        lm.config.dtype = next(p.dtype for p in lm.parameters() if p.is_floating_point())
        lm.config.architectures = [type(lm).__name__]  # as save_pretrained writes it
        lm.config.save_pretrained(str(tmp))
        lm.config.use_cache = False
        if getattr(lm, "generation_config", None) is not None and lm.can_generate():
            lm.generation_config.save_pretrained(str(tmp))
        if getattr(lm, "_auto_class", None) is not None:  # remote code: its modeling files beside the weights
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(lm, str(tmp), config=lm.config)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    dist.barrier()
    return out if rank == 0 else None
