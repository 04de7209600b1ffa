"""The DeepSpeed config of a plan: one pure function (imports no torch).

The launcher writes its result to RUN_DIR/ds_config.json; the trainer passes the
same dict to ``deepspeed.initialize``. The optimizer and the LR scheduler are NOT
in the config: the trainer builds them (torch AdamW, or DeepSpeedCPUAdam when the
optimizer is offloaded) so that warmup + cosine decay is ours, not DeepSpeed's.

ZeRO bucket sizes are DeepSpeed's own defaults (deepspeed/runtime/zero/config.py,
in elements), spelled out so the planner's memory model and the job agree even if
a future DeepSpeed changes its defaults.
"""

from __future__ import annotations

from typing import Any

# DeepSpeed defaults (runtime/zero/config.py), counted in elements: the planner's memory
# model uses the very same constants.
from ..planner.zero import (
    ALLGATHER_BUCKET_SIZE,
    REDUCE_BUCKET_SIZE,
    STAGE3_MAX_LIVE_PARAMETERS,
    STAGE3_PARAM_PERSISTENCE_THRESHOLD,
    STAGE3_PREFETCH_BUCKET_SIZE,
    SUB_GROUP_SIZE,
)
from ..planner.schema import Plan

# DeepSpeed fp16 dynamic loss scaling defaults (runtime/fp16/loss_scaler.py, runtime/constants.py).
FP16_INITIAL_SCALE_POWER = 16
FP16_LOSS_SCALE_WINDOW = 1000
FP16_HYSTERESIS = 2
FP16_MIN_LOSS_SCALE = 1

STEPS_PER_PRINT = 10**9  # the trainer logs; keep DeepSpeed quiet


def _zero_config(plan: Plan) -> dict[str, Any]:
    layout = plan.layout
    zero: dict[str, Any] = {
        "stage": layout.zero_stage,
        "reduce_bucket_size": REDUCE_BUCKET_SIZE,
        "allgather_bucket_size": ALLGATHER_BUCKET_SIZE,
    }
    if layout.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": STAGE3_PREFETCH_BUCKET_SIZE,
                "stage3_max_live_parameters": STAGE3_MAX_LIVE_PARAMETERS,
                "stage3_param_persistence_threshold": STAGE3_PARAM_PERSISTENCE_THRESHOLD,
                "sub_group_size": SUB_GROUP_SIZE,
                # export gathers the partitions itself (GatheredParameters)
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if layout.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if layout.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def _precision_config(plan: Plan) -> dict[str, Any]:
    if plan.training.precision == "bf16":
        return {"bf16": {"enabled": True}}
    if plan.training.precision == "fp32":  # DeepSpeed's default: no mixed precision
        return {"bf16": {"enabled": False}, "fp16": {"enabled": False}}
    return {
        "fp16": {
            "enabled": True,
            "loss_scale": 0,  # 0 = dynamic loss scaling
            "initial_scale_power": FP16_INITIAL_SCALE_POWER,
            "loss_scale_window": FP16_LOSS_SCALE_WINDOW,
            "hysteresis": FP16_HYSTERESIS,
            "min_loss_scale": FP16_MIN_LOSS_SCALE,
        }
    }


def build_ds_config(plan: Plan) -> dict[str, Any]:
    """The DeepSpeed config dict for ``plan`` (JSON-serialisable, deterministic).

    train_batch_size = micro_batch_size x gradient_accumulation_steps x dp_degree,
    dp_degree = num_gpus / sp_degree (DeepSpeed divides the world by
    ``sequence_parallel_size`` in the same way: runtime/config.py).
    """
    layout, training = plan.layout, plan.training
    micro = layout.micro_batch_size
    gas = training.gradient_accumulation_steps
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * layout.dp_degree,
        "gradient_clipping": training.max_grad_norm,
        **_precision_config(plan),
        "zero_optimization": _zero_config(plan),
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if layout.sp_degree > 1:
        config["sequence_parallel_size"] = layout.sp_degree
    return config
