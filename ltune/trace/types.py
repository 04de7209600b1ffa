"""What the tracer, its MemTracker subclass and the sharding share: MemTracker's categories, the
origins of activation bytes, and the traced timeline. Pure Python: no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

# MemTracker's categories (the values of torch.distributed._tools.mem_tracker._MemRefType)
CATEGORIES = ("Parameter", "Buffer", "Gradient", "Activation", "Temp", "Optstate", "Other")
#: where an activation/temp storage was made: (pass, region)
PASSES = ("input", "forward", "recompute", "backward")
REGIONS = ("embed", "layer", "norm", "head")
ORIGINS = tuple(f"{p}:{r}" for p in PASSES for r in REGIONS)


@dataclass
class Timeline:
    """Per-operator snapshots of the traced (unsharded) memory, in bytes.

    `values[i]` has one entry per CATEGORIES name; `origins[i]` one per ORIGINS name (the live
    Activation + Temp bytes by where they were made); `phases[i]` is forward, backward or
    optimizer; `regions[i]` the REGIONS entry active.
    """

    phases: list[str] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    values: list[tuple[int, ...]] = field(default_factory=list)
    origins: list[tuple[int, ...]] = field(default_factory=list)
    marks: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass
class RawTrace:
    """What one traced step gives before any sharding."""

    timeline: Timeline
    num_params: int  # trainable parameter elements (all of them for full fine-tuning)
    #: elements of every model-dtype parameter tensor, frozen ones too (not QLoRA's 4-bit weights)
    param_numels: list[int]
    dtype_bytes: int
    tokens_per_rank: int
    micro_batch_size: int
    num_docs: int
    trace_s: float
    max_rss_bytes: int
    #: parallel to param_numels: whether the tensor trains (None: all of them, as full fine-tuning)
    param_trainable: list[bool] | None = None
    #: bytes of the parameters that are not floating point: QLoRA's packed 4-bit weights
    quantized_bytes: int = 0
    #: with inventory=True: (origin, operator, bytes) of every live activation storage at the
    #: moment the activation bytes peak (a diagnostic of what the analytic terms miss)
    inventory: list[tuple[str, str, int]] | None = None
