"""The MemTracker subclass behind `ltune trace`: MemTracker's per-category accounting, plus a
per-operator timeline and the origin (pass and region) of every activation/temp storage.

Imports torch at module level: `tracer.trace_step` imports this module only when a trace runs.
The MemTracker internals used here (`_update_snap`, `_update_peak_stats`, `_curr_mem_snap`,
`_mod_tracker`, `_in_ac`, `_in_opt`, `_track`) are those of torch/distributed/_tools/mem_tracker.py.
"""

from __future__ import annotations

import torch
from torch._guards import active_fake_mode
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType, _UpdateType

from .types import CATEGORIES, ORIGINS, Timeline

ACT_TYPES = (_MemRefType.ACT, _MemRefType.TEMP)
CPU = torch.device("cpu")
LAYER_TAG = ".layers."


def kernel_temporaries() -> dict:
    """Operators whose CUDA kernel allocates a large temporary inside itself (so a dispatch-level
    trace does not see it), and a function making a fake tensor of that temporary's size.

    - aten.logsumexp (ATen/native/ReduceOps.cpp `logsumexp_out_impl`): `(self - maxes).exp_()`
      holds one tensor the size of the input (used by the trainer's chunked loss).
    """
    aten = torch.ops.aten
    return {aten.logsumexp.default: lambda x, *args, **kwargs: torch.empty_like(x, memory_format=torch.contiguous_format)}


def module_region(parents) -> str:
    """The REGIONS entry of the innermost module path among `parents` (MemTracker's module stack)."""
    region = "head"  # the output layer and the loss, inside or outside a module
    body = False
    for name in parents:
        if LAYER_TAG in name:
            return "layer"
        if name.endswith("lm_head"):
            return "head"
        if name.endswith(("embed_tokens", "rotary_emb")):
            region = "embed"  # the layers' shared inputs: embeddings, RoPE cos/sin
        elif name.endswith(".norm") and region == "head":
            region = "norm"
        elif name.endswith("lm.model"):
            body = True
    if region == "head" and body:
        region = "embed"  # made in the model body outside layers: the attention mask
    return region


class TimelineTracker(MemTracker):
    """A MemTracker that also records the timeline and the origin of activation bytes.

    `with_inventory`: False, True (inventory at the overall activation peak) or an ORIGINS-style
    "phase:region" (inventory at the peak within that phase and region).
    """

    def __init__(self, timeline: Timeline, with_inventory: bool | str = False) -> None:
        super().__init__()
        self.timeline = timeline
        self.with_inventory = with_inventory
        self.kernel_temps = kernel_temporaries()
        self.started_model = False
        self._origin_of: dict[int, int] = {}  # id(winfo) -> ORIGINS index
        self._origin_bytes = [0] * len(ORIGINS)
        self._op = ""  # the operator being dispatched (for the inventory)
        self._labels: dict[int, str] = {}  # id(winfo) -> operator that made it (inventory only)
        self._sizes: dict[int, int] = {}
        self.inventory: list[tuple[str, str, int]] | None = [] if with_inventory else None
        self._inventory_peak = -1

    # -- where are we
    def _region(self) -> str:
        return module_region(self._mod_tracker.parents)

    def _origin_index(self) -> int:
        if not self.started_model:
            pas = "input"
        elif self._mod_tracker.is_bw:
            pas = "recompute" if self._in_ac else "backward"
        else:
            pas = "forward"
        return ORIGINS.index(f"{pas}:{self._region()}")

    # -- bookkeeping of activation bytes by origin, at MemTracker's single update point
    def _update_snap(self, u_type, winfo, old_mem_consumed=None, old_reftype=None) -> None:
        super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)
        key = id(winfo)
        if u_type == _UpdateType.ADD:
            if winfo.reftype in ACT_TYPES:
                self._add_origin(key, winfo.mem_consumed)
                if self.inventory is not None:
                    self._labels[key] = self._op
                    self._sizes[key] = winfo.mem_consumed
        elif u_type == _UpdateType.DEL:
            idx = self._origin_of.pop(key, None)
            self._labels.pop(key, None)
            self._sizes.pop(key, None)
            if idx is not None:
                self._origin_bytes[idx] -= winfo.mem_consumed
        elif u_type == _UpdateType.REF:
            idx = self._origin_of.get(key)
            if idx is not None and winfo.reftype not in ACT_TYPES:
                self._origin_bytes[idx] -= winfo.mem_consumed
                del self._origin_of[key]
            elif idx is None and winfo.reftype in ACT_TYPES:
                self._add_origin(key, winfo.mem_consumed)
        elif u_type == _UpdateType.SIZE:
            idx = self._origin_of.get(key)
            if idx is not None:
                self._origin_bytes[idx] += winfo.mem_consumed - old_mem_consumed

    def _add_origin(self, key: int, mem_consumed: int) -> None:
        idx = self._origin_index()
        self._origin_of[key] = idx
        self._origin_bytes[idx] += mem_consumed

    def _update_peak_stats(self, peak_state) -> None:
        # MemTracker's own version also walks every module's stats after every operator
        # (most of the run time on a large model); the timeline holds what we need.
        for dev, dev_snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(dev_snap)
        self._record()

    def _values(self) -> tuple[int, ...]:
        snap = self._curr_mem_snap.get(CPU, {})
        return tuple(snap.get(cat, 0) for cat in self._ref_class)

    def _record(self) -> None:
        timeline = self.timeline
        values = self._values()
        origins = tuple(self._origin_bytes)
        if timeline.values and values == timeline.values[-1] and origins == timeline.origins[-1]:
            return
        phase = "optimizer" if self._in_opt else ("backward" if self._mod_tracker.is_bw else "forward")
        timeline.phases.append(phase)
        timeline.regions.append(self._region())
        timeline.values.append(values)
        timeline.origins.append(origins)
        self._update_inventory(f"{phase}:{timeline.regions[-1]}", sum(origins))

    def _update_inventory(self, where: str, activation_bytes: int) -> None:
        """Keep the live activation storages at the peak of `activation_bytes` (where asked)."""
        if (
            self.inventory is not None
            and self.with_inventory in (True, where)
            and activation_bytes > self._inventory_peak
        ):
            self._inventory_peak = activation_bytes
            self.inventory = [
                (ORIGINS[idx], self._labels.get(key, "?"), self._sizes.get(key, 0))
                for key, idx in self._origin_of.items()
            ]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = str(func)
        if func in self.kernel_temps and active_fake_mode() is self._fake_mode_on_entry:
            # a temporary the CUDA kernel allocates inside itself, invisible to dispatch
            reftype = _MemRefType.TEMP if self._mod_tracker.is_bw and not self._in_ac else _MemRefType.ACT
            self._op = f"{func} (kernel temporary)"
            temp = self.kernel_temps[func](*args, **(kwargs or {}))
            self._track(reftype, temp)
            self._update_peak_stats(None)
            del temp
            self._op = str(func)
        return super().__torch_dispatch__(func, types, args, kwargs)

    def mark(self, name: str) -> None:
        self.timeline.marks[name] = self._values()


def make_tracker(timeline: Timeline, with_inventory: bool | str = False) -> TimelineTracker:
    """A TimelineTracker recording into `timeline`, after checking MemTracker's categories."""
    tracker = TimelineTracker(timeline, with_inventory)
    names = tuple(c.value for c in tracker._ref_class)
    if names != CATEGORIES:
        raise RuntimeError(f"MemTracker's categories changed ({names}); ltune.trace expects {CATEGORIES}")
    return tracker
