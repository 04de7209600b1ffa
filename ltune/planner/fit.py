"""Re-checking a saved plan against its target: what `ltune check` and `ltune launch` use."""

from __future__ import annotations

from ..profiles import GIB, load_gpu
from .io import PlanError
from .schema import Evaluation, Plan
from .search import Request, evaluate


def request_for(plan: Plan) -> Request:
    """The search request a plan stands for (its model, GPU, context, precision and method)."""
    gpu = load_gpu(plan.hardware.gpu)
    if plan.training.precision == "bf16" and not gpu.supports_bf16:
        raise PlanError(f"training.precision: {gpu.name} has no bf16 (got 'bf16'); use fp16")
    host_mem_gib = plan.hardware.host_mem_gib
    host_mem_bytes_per_node = int(host_mem_gib * GIB) if host_mem_gib is not None else None
    margin = plan.prediction.safety_margin if plan.prediction else None
    fields = dict(
        model=plan.model.architecture,
        gpu=gpu,
        seq_len=plan.training.seq_len,
        precision=plan.training.precision,
        loss_chunk_tokens=plan.training.loss_chunk_tokens,
        host_mem_bytes_per_node=host_mem_bytes_per_node,
        method=plan.method,
    )
    if margin is not None:
        fields["safety_margin"] = margin
    return Request(**fields)


def check_fit(plan: Plan) -> Evaluation:
    """The plan's layout judged by today's model: `.fits`, the breakdown, the step time."""
    return evaluate(request_for(plan), plan.layout)
