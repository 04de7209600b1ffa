"""Trace one training step's memory on fake CPU tensors, exactly, without a GPU.

The trainer's own model (`ltune.trainer.model.build_model`: transformers body, `LossHead` with
the trainer's full or chunked loss, non-reentrant checkpointing per layer) is built on the meta
device, materialised as fake CPU tensors (`FakeTensorMode`: shapes, dtypes and storages, no bytes)
and runs one step -- forward of one rank's packed micro-batch (seq_len / sp_degree tokens per
sequence, several documents, position_ids restarting), backward, AdamW -- under PyTorch's
`MemTracker` (torch/distributed/_tools/mem_tracker.py), which sees every storage the dispatcher
creates and frees and files it under PARAM, BUFFER, GRAD, ACT, TEMP, OPT or OTH. We record the
per-category total after every operator (the timeline), and split the activation bytes by where
they were made (forward of a layer, recompute, backward, the loss); ZeRO and sequence-parallel
sharding are then applied arithmetically (sharding.py).

Differences from a CUDA run, by construction, and how they are corrected:
- attention kernel: the trainer's CPU path (sdpa once per document, `_sdpa_per_document`) is not
  what CUDA runs; under the trace the trainer's `varlen_attention` core is replaced by
  `flash.flash_varlen_memory`, which allocates and saves exactly what flash-attn 2's varlen
  kernel does. The trainer's glue around it (transposes, reshapes) runs as is. Eager attention
  is traced as is: the same aten ops run on both devices.
- allocator rounding: MemTracker rounds CUDA storages up to 512 B blocks but counts CPU storages to
  the byte; we apply the same 512 B rounding to the fake CPU storages (`_cuda_block_rounding`).
  The caching allocator's 2 MiB / 20 MiB segments (fragmentation), the CUDA context, cuBLAS
  workspaces and NCCL buffers are not tensors: the trace leaves them to the analytic reserve.
- routing (mixture-of-experts models): fake tensors carry no values, so no token is routed anywhere.
  The trainer pins transformers' "grouped_mm" experts (trainer/model.py EXPERTS_IMPLEMENTATION;
  transformers/integrations/moe.py `grouped_mm_experts_forward`): every tensor it makes is sized by
  S = tokens x top_k (sorted rows, one grouped matmul up and one down) and by nothing the routing
  decides, so the traced bytes are those of any routing, balanced or all tokens on one expert
  (bench/moe_routing_memory.py, real CPU tensors: 34.23 MiB both ways for one Mixtral block of 2048
  tokens). transformers' "eager" experts loop over the experts hit and would differ (29.23 MiB with
  every token on experts 0/1, 32.98 MiB spread): not what ltune runs.
- multi-head latent attention: its value head is smaller than its q/k head; as the trainer does
  for flash-attn (trainer/attention.py `one_head_size`), v is padded to the q/k head size before the
  kernel and the output cropped.
- dtype: DeepSpeed casts the module to bf16/fp16 at `initialize`; we cast it on meta before
  materialising (buffers included, as `module.bfloat16()` does).
- optimizer: DeepSpeed runs a fused Adam on fp32 master partitions; we run torch's fused AdamW on
  fp32 master copies (no per-parameter temporaries, as FusedAdam), its states initialised before
  the traced step so the step sees the steady state (states alive during forward and backward).
  How much of it each rank holds is DeepSpeed's partitioning, applied in sharding.py.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

from ..planner.schema import Hardware, Layout, Method, ModelSpec, Plan, Training, check_sp_degree
from ..profiles.schema import ModelProfile
from .types import RawTrace, Timeline

CUDA_BLOCK_BYTES = 512  # c10/cuda/CUDACachingAllocator.cpp kMinBlockSize
DEFAULT_NUM_DOCS = 4
#: the phases of a trace, in order, as ``on_phase`` is told them (the last in ltune.trace.trace_memory)
PHASES = {
    "model": "building the model on fake tensors",
    "optimizer": "initialising the optimizer states",
    "forward": "forward",
    "backward": "backward",
    "step": "optimizer step",
    "shard": "partitioning (ZeRO, sequence parallel)",
}
PhaseCallback = Callable[[str], None]


def _no_phase(name: str) -> None:
    """The default ``on_phase``: nothing."""


def validate(model: ModelProfile, seq_len: int, layout: Layout, num_docs: int) -> int:
    """Check the inputs; return the tokens each rank holds per sequence (seq_len / sp_degree)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len ({seq_len}) must be positive")
    check_sp_degree(layout.sp_degree, model)
    if seq_len % layout.sp_degree:
        raise ValueError(f"sp_degree ({layout.sp_degree}) must divide seq_len ({seq_len})")
    tokens = seq_len // layout.sp_degree
    if num_docs <= 0 or num_docs > tokens:
        raise ValueError(f"num_docs ({num_docs}) must be between 1 and the tokens per rank ({tokens})")
    return tokens


def doc_lengths(tokens: int, num_docs: int) -> list[int]:
    base, extra = divmod(tokens, num_docs)
    return [base + (1 if i < extra else 0) for i in range(num_docs)]


def trace_plan(
    model: ModelProfile, seq_len: int, layout: Layout, precision: str, loss_chunk_tokens: int,
    method: Method | None = None,
) -> Plan:
    """The Plan the trainer's build_model takes, for CLI options given without a plan.yaml
    (`method`: full fine-tuning when not given, or LoRA/QLoRA adapters)."""
    return Plan(
        model=ModelSpec(name=model.name, architecture=model),
        hardware=Hardware(gpu="cpu"),
        layout=layout,
        training=Training(seq_len=seq_len, max_steps=1, precision=precision, loss_chunk_tokens=loss_chunk_tokens),
        method=method or Method(),
    )


@contextlib.contextmanager
def _cuda_block_rounding():
    """Count fake CPU storages as the CUDA caching allocator would: rounded up to 512 B."""
    from torch.distributed._tools import mem_tracker as mt_mod

    winfo = mt_mod._WeakRefInfo
    original = winfo._calculate_mem_consumed

    def rounded(self) -> int:
        return math.ceil(self.size * self.element_size / CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES

    winfo._calculate_mem_consumed = rounded
    try:
        yield
    finally:
        winfo._calculate_mem_consumed = original


@contextlib.contextmanager
def _flash_kernel():
    """Run the trainer's varlen attention with flash-attn 2's memory (see module docstring)."""
    from ..trainer import attention

    from .flash import flash_varlen_memory

    def kernel(q, k, v, cu_seqlens, max_seqlen, causal=True, scale=None, sliding_window=None, softcap=None):
        # a window and a soft-cap change what flash computes, not what it allocates
        # (flash_api.cpp mha_varlen_fwd/bwd: window_size_left and softcap are kernel arguments)
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"kv heads ({k.shape[1]}) must divide query heads ({q.shape[1]})")
        num_docs = cu_seqlens.shape[0] - 1
        # flash-attn takes one head size: MLA's value heads padded as the trainer pads them
        return attention.one_head_size(lambda q, k, v: flash_varlen_memory(q, k, v, num_docs), q, k, v)

    original = attention.varlen_attention
    attention.varlen_attention = kernel
    try:
        yield
    finally:
        attention.varlen_attention = original


@contextlib.contextmanager
def _quantized_base(plan: Plan):
    """QLoRA: every decoder linear layer becomes quant4.Linear4bitMemory (bitsandbytes
    Linear4bit's memory) before peft puts the adapters around it (trainer/model.py build_model
    calls apply_adapters right after the model is built). Nothing changes for full and lora."""
    if plan.method.kind != "qlora":
        yield
        return
    from ..trainer import model as model_mod
    from ..trainer.lora import decoder_linears

    from .quant4 import quantize_decoder_linears

    original = model_mod.apply_adapters

    def quantize_then_adapt(lm, plan_):
        quantize_decoder_linears(lm, decoder_linears(lm, plan_), plan_.method.double_quant)
        return original(lm, plan_)

    model_mod.apply_adapters = quantize_then_adapt
    try:
        yield
    finally:
        model_mod.apply_adapters = original


@contextlib.contextmanager
def _cuda_dropout():
    """Dropout as CUDA runs it (ATen `dropout` takes `native_dropout` on CUDA, Dropout.cpp
    `is_fused_kernel_acceptable`): the output in the input dtype and a bool mask, the mask saved
    for backward (`native_dropout_backward`: grad * mask * scale). The CPU path instead draws a
    noise tensor in the input dtype and saves it (`_dropout_impl`). Used by peft's lora_dropout."""
    import torch
    import torch.nn.functional as F

    class _NativeDropoutMemory(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            mask = torch.empty_like(x, dtype=torch.bool)
            out = torch.empty_like(x)
            ctx.save_for_backward(mask)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            (mask,) = ctx.saved_tensors
            return torch.empty_like(grad_out)

    original = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p <= 0 or inplace:
            return original(input, p, training, inplace)
        return _NativeDropoutMemory.apply(input)

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = original


def build_fake_model(plan: Plan, fake_mode):
    """The trainer's TrainModel on meta, cast to the plan's dtype, materialised as fake CPU tensors."""
    import warnings

    import torch

    from ..trainer.model import build_model, torch_dtype

    with warnings.catch_warnings(), _quantized_base(plan):
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable's rename
        with torch.device("meta"):
            model = build_model(plan).to(torch_dtype(plan.training.precision))
    with fake_mode:
        model = model.to_empty(device="cpu")
    model.lm.tie_weights()  # to_empty makes one tensor per parameter name: tie them again
    return model


class _NoHook:
    """A removable handle that removes nothing (stands for a frozen parameter's grad hooks)."""

    def remove(self) -> None:
        pass


def _track_parameters(tracker, module) -> None:
    """File every parameter and buffer of `module` with the tracker, and the gradients of the
    trainable ones as Gradient. MemTracker installs a gradient hook on each parameter, which
    torch refuses on a frozen one (LoRA's base weights, the 4-bit weights): those get a handle
    that does nothing, so that MemTracker's own module hooks skip them too."""
    for param in module.parameters():
        if not param.requires_grad:
            tracker._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
    tracker._track_module_params_and_buffers(module, install_grad_hooks=True)


def _make_optimizer(params, fake_mode):
    """Fused AdamW over fp32 master copies, states initialised (the steady state of step > 1)."""
    import torch

    class _MixedPrecisionAdamW(torch.optim.AdamW):
        """fp32 grads from the 16-bit grads, fused AdamW on the masters, masters copied back."""

        def __init__(self, model_params, masters):
            super().__init__(masters, lr=1e-5, betas=(0.9, 0.95), fused=True)
            self._pairs = list(zip(model_params, masters))

        @torch.no_grad()
        def step(self, closure=None):
            for p, m in self._pairs:
                if p.grad is not None:
                    m.grad = p.grad.float()
            super().step()
            for p, m in self._pairs:
                p.copy_(m)
                m.grad = None

    with fake_mode:
        masters = [torch.empty_like(p, dtype=torch.float32) for p in params]
        opt = _MixedPrecisionAdamW(params, masters)
        for m in masters:
            m.grad = torch.empty_like(m)
        torch.optim.AdamW.step(opt)
        for m in masters:
            m.grad = None
    return opt, masters


def trace_step(
    model: ModelProfile,
    seq_len: int,
    layout: Layout,
    precision: str = "bf16",
    *,
    num_docs: int = DEFAULT_NUM_DOCS,
    loss_chunk_tokens: int = 4096,
    plan: Plan | None = None,
    inventory: bool | str = False,
    on_phase: PhaseCallback | None = None,
    method: Method | None = None,
) -> RawTrace:
    """Run one fake training step of one rank's micro-batch under MemTracker; return the timeline.

    ``on_phase(name)`` is called as each phase starts (PHASES: model, optimizer, forward, backward, step)."""
    import resource

    from torch._subclasses.fake_tensor import FakeTensorMode

    from .tracker import make_tracker

    on_phase = on_phase or _no_phase
    tokens = validate(model, seq_len, layout, num_docs)
    start = time.perf_counter()
    plan = plan or trace_plan(model, seq_len, layout, precision, loss_chunk_tokens, method)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    on_phase("model")
    train_model = build_fake_model(plan, fake_mode)
    params = [p for p in train_model.parameters() if p.requires_grad]
    # every model-dtype parameter, frozen ones too (ZeRO-3 partitions them all); the packed 4-bit
    # weights of QLoRA (not floating point) apart, whole on every rank, with their quantization
    # constants, which bitsandbytes keeps in each weight's QuantState rather than in module tensors
    # (quant4.Linear4bitMemory.storage_bytes)
    from .quant4 import Linear4bitMemory

    model_dtype_params = [p for p in train_model.parameters() if p.is_floating_point()]
    quantized_bytes = sum(m.storage_bytes() for m in train_model.modules() if isinstance(m, Linear4bitMemory))
    on_phase("optimizer")
    opt, masters = _make_optimizer(params, fake_mode)
    timeline = Timeline()
    tracker = make_tracker(timeline, with_inventory=inventory)
    lengths = doc_lengths(tokens, num_docs)
    with _cuda_block_rounding(), _flash_kernel(), _cuda_dropout():
        tracker.track_external(opt, *masters)
        # params and buffers, with the grad hooks that file every parameter gradient as Gradient
        # (also the output head's, which the chunked loss uses without calling the module)
        _track_parameters(tracker, train_model)
        with fake_mode, tracker:
            tracker.mark("start")
            # the batch stays referenced here, alive to the end of the step as a real loop's is
            batch = _packed_batch(layout.micro_batch_size, lengths)
            _run_step(train_model, opt, tracker, batch, max(lengths), on_phase)
    return RawTrace(
        timeline=timeline,
        num_params=sum(p.numel() for p in params),
        param_numels=[p.numel() for p in model_dtype_params],
        param_trainable=[p.requires_grad for p in model_dtype_params],
        quantized_bytes=quantized_bytes,
        dtype_bytes=params[0].element_size(),
        tokens_per_rank=tokens,
        micro_batch_size=layout.micro_batch_size,
        num_docs=num_docs,
        trace_s=time.perf_counter() - start,
        max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        inventory=tracker.inventory,
    )


def _packed_batch(micro_batch_size: int, lengths: list[int]):
    """One rank's packed micro-batch of documents of `lengths` tokens: input_ids, position_ids
    (restarting per document), labels, cu_seqlens. Made inside the tracker: the step's input."""
    import torch

    b, tokens = micro_batch_size, sum(lengths)
    input_ids = torch.zeros((b, tokens), dtype=torch.int64)
    labels = torch.zeros((b, tokens), dtype=torch.int64)
    position_ids = torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths]).expand(b, tokens)
    cu_seqlens = torch.zeros(b * len(lengths) + 1, dtype=torch.int32)
    return input_ids, position_ids, labels, cu_seqlens


def _run_step(train_model, opt, tracker, batch, max_doc_len: int, on_phase: PhaseCallback = _no_phase) -> None:
    """Forward, backward, optimizer step, zero_grad, inside the fake mode and the tracker; marks
    after_forward, after_backward, after_step and end on the timeline."""
    input_ids, position_ids, labels, cu_seqlens = batch
    tracker.started_model = True
    on_phase("forward")
    loss_sum, num_tokens = train_model(input_ids, position_ids, labels, cu_seqlens, max_doc_len)
    loss = loss_sum / num_tokens
    tracker.mark("after_forward")
    on_phase("backward")
    loss.backward()
    del loss, loss_sum, num_tokens
    tracker.mark("after_backward")
    on_phase("step")
    opt.step()
    tracker.mark("after_step")
    train_model.zero_grad(set_to_none=True)
    tracker.mark("end")
