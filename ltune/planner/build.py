"""Turning a search result into a plan.yaml."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from .checkpointing import predict_checkpoint, saved_params
from .io import describe_error
from .schema import CheckpointPrediction, Evaluation, Hardware, ModelSpec, Plan, Prediction, Training
from .search import Request

#: `ltune plan`'s flags for the plan.yaml fields they set
PLAN_FLAGS = {"max_steps": "--steps", "learning_rate": "--lr", "data": "--data", "path": "--model-path",
              "tokenizer": "--tokenizer"}


def check_plan_fields(training: dict, model_files: dict) -> None:
    """The training and model-file values `ltune plan -o` will write, checked as plan.yaml
    checks them, before any search: a one-line ValueError naming the flag and the value."""
    files = {k: str(v) for k, v in model_files.items() if v is not None}
    for model, fields, base in ((Training, training, {"seq_len": 1, "max_steps": 1}),
                                (ModelSpec, files, {"name": "x", "architecture": None})):
        try:
            model.model_validate({**base, **fields})
        except ValidationError as e:
            for err in e.errors():
                if err["loc"] and err["loc"][0] in fields:
                    flag = PLAN_FLAGS.get(str(err["loc"][0]), str(err["loc"][0]))
                    raise ValueError(f"{flag}: {describe_error({**err, 'loc': ()})}") from None


def relative_to_plan(path: str, plan_path: Path) -> str:
    """A path as the plan file will read it: relative to the plan's folder (launch's rule)."""
    return os.path.relpath(Path(path).resolve(), Path(plan_path).resolve().parent)


def model_folder_for_plan(path: str, plan_path: Path) -> str:
    """--model-path/--tokenizer as the plan keeps it: a folder relative to the plan's folder,
    or an `org/name` that is no folder here but sits in the local Hugging Face cache, as written
    (ltune.job.paths.resolve_model_path finds it again where the job runs)."""
    from ..profiles import hf_cache_snapshot

    try:
        here = Path(path).exists()
    except OSError:  # a name the file system refuses (too long): not a folder here
        here = False
    if not here and hf_cache_snapshot(path) is not None:
        return path
    return relative_to_plan(path, plan_path)


def checkpoint_for(req: Request, ev: Evaluation, training: dict | None = None) -> CheckpointPrediction:
    """The checkpoint policy of one evaluated layout (size, save time, interval) at the default
    storage bandwidth (a plan edited to name its own is re-predicted by ltune launch)."""
    training = training or {}
    return predict_checkpoint(
        saved_params(req.model, req.method), ev.layout, req.precision, req.gpu.gpus_per_node, ev.throughput.step_time_s,
        checkpoint_every=training.get("checkpoint_every"),
        checkpoint_minutes=training.get("checkpoint_minutes", Training.model_fields["checkpoint_minutes"].default),
    )


def prediction_for(req: Request, ev: Evaluation, training: dict) -> Prediction:
    """The plan's prediction: memory, step time and the checkpoint policy."""
    return Prediction(memory=ev.memory, throughput=ev.throughput, safety_margin=req.safety_margin,
                      checkpoint=checkpoint_for(req, ev, training))


def build_plan(req: Request, ev: Evaluation, model_name: str, training: dict, host_mem_gib: float | None,
               model_files: dict | None = None) -> Plan:
    """The plan for one evaluated layout: model, hardware, layout, training, method, prediction.
    `model_files` may hold `path` (local HF weights) and `tokenizer` folders."""
    per_node = req.gpu.gpus_per_node
    nodes = -(-ev.layout.num_gpus // per_node)
    if nodes > 1 and ev.layout.num_gpus % per_node:
        raise ValueError(
            f"num_gpus ({ev.layout.num_gpus}) must be a multiple of the GPUs per node ({per_node}) "
            f"for {req.gpu.name} across nodes"
        )
    return Plan(
        model=ModelSpec(name=model_name, architecture=req.model, **(model_files or {})),
        hardware=Hardware(gpu=req.gpu.name, num_nodes=nodes, host_mem_gib=host_mem_gib),
        layout=ev.layout,
        training=Training(
            seq_len=req.seq_len,
            precision=req.precision,
            loss_chunk_tokens=req.loss_chunk_tokens,
            **{"gradient_accumulation_steps": ev.gradient_accumulation_steps, **training},
        ),
        method=req.method,
        prediction=prediction_for(req, ev, training),
    )
