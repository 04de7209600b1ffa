"""build_ds_config(plan) compared as data, for a few plans."""

from __future__ import annotations

import subprocess
import sys

from ltune.job.ds_config import build_ds_config

ZERO3_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "sub_group_size": 1_000_000_000,
    "stage3_gather_16bit_weights_on_model_save": False,
}


def test_zero3_bf16_eight_gpus(plan_factory):
    make_plan = plan_factory
    plan = make_plan(
        layout={"num_gpus": 8, "zero_stage": 3, "micro_batch_size": 1},
        training={"seq_len": 8192, "max_steps": 10, "gradient_accumulation_steps": 4, "max_grad_norm": 1.0},
    )
    assert build_ds_config(plan) == {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 4,
        "train_batch_size": 32,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, **ZERO3_DEFAULTS},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def test_zero2_fp16_optimizer_offload(plan_factory):
    make_plan = plan_factory
    plan = make_plan(
        layout={"num_gpus": 4, "zero_stage": 2, "micro_batch_size": 2, "offload": "optimizer"},
        training={"seq_len": 1024, "max_steps": 10, "precision": "fp16", "max_grad_norm": 0.5},
    )
    assert build_ds_config(plan) == {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 8,
        "gradient_clipping": 0.5,
        "fp16": {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_optimization": {
            "stage": 2,
            "reduce_bucket_size": 500_000_000,
            "allgather_bucket_size": 500_000_000,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def test_fp32_disables_mixed_precision(plan_factory):
    plan = plan_factory(
        layout={"num_gpus": 2, "zero_stage": 0, "micro_batch_size": 1},
        training={"seq_len": 256, "max_steps": 10, "precision": "fp32"},
    )
    config = build_ds_config(plan)
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}
    assert config["zero_optimization"]["stage"] == 0


def test_sequence_parallel_divides_the_batch_and_offload_all(plan_factory):
    make_plan = plan_factory
    # 8 GPUs, sp 4: dp degree 2, so train_batch_size = 1 x 3 x 2.
    plan = make_plan(
        layout={"num_gpus": 8, "zero_stage": 3, "sp_degree": 4, "offload": "all"},
        training={"seq_len": 32768, "max_steps": 10, "gradient_accumulation_steps": 3},
    )
    config = build_ds_config(plan)
    assert config["train_batch_size"] == 6
    assert config["sequence_parallel_size"] == 4
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    # sp 1 writes no sequence_parallel_size at all
    assert "sequence_parallel_size" not in build_ds_config(make_plan())


def test_is_json_and_job_and_launcher_import_no_torch():
    """ltune.job (ds_config, paths, data checks) and the launcher run without torch,
    DeepSpeed or transformers, and the launcher does not import the trainer."""
    code = (
        "import sys, json;"
        "from tests.conftest import make_plan;"
        "import ltune.job.constants, ltune.job.data_files, ltune.job.errors, ltune.job.paths;"
        "import ltune.launcher, ltune.launcher.data, ltune.launcher.rundir, ltune.launcher.spec;"
        "from ltune.job.ds_config import build_ds_config;"
        "json.dumps(build_ds_config(make_plan()));"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'transformers')"
        " or m.startswith('ltune.trainer')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

