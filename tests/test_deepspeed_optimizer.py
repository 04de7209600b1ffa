"""What DeepSpeed 0.19.8 builds around the trainer's optimizer, against the planner's model states.

One process (gloo, world size 1) initializes the trainer's own engine (ltune.trainer.engine with
build_ds_config's config) for each precision and ZeRO stage whose model states the planner counts
differently, and reports the optimizer wrapper DeepSpeed chose and whether it keeps an fp32 master
copy apart from the parameters. The planner's master_weights_bytes must be zero exactly when there
is none. (~15 s: four engines in one process.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

from ltune.planner.memory import master_weights_bytes  # noqa: E402
from ltune.planner.schema import Layout  # noqa: E402
from ltune.planner.shape import Shape  # noqa: E402
from conftest import free_port as _free_port  # noqa: E402

CASES = [("bf16", 0), ("fp32", 0), ("fp32", 1), ("fp32", 3)]

SCRIPT = r"""
import json, sys
import torch
from tests.conftest import make_plan
from ltune.job.ds_config import build_ds_config
from ltune.trainer.engine import init_distributed, initialize
from ltune.trainer.model import build_model

init_distributed()
out = {}
for precision, stage in json.loads(sys.argv[1]):
    plan = make_plan(layout={"num_gpus": 1, "zero_stage": stage}, training={"precision": precision})
    ds_config = build_ds_config(plan)
    model = build_model(plan, ds_config)
    engine = initialize(plan, ds_config, model, total_steps=4)
    opt = engine.optimizer
    params = {p.data_ptr() for p in engine.module.parameters()}
    if hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer
        masters = [t for g in opt.fp32_groups for t in g]
    elif hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO 1-2
        masters = list(opt.single_partition_of_fp32_groups)
    elif hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        masters, params = list(opt.fp32_partitioned_groups_flat), {t.data_ptr() for t in opt.fp16_partitioned_groups_flat}
    else:  # the bare optimizer steps on the parameters themselves
        masters = [p for g in opt.param_groups for p in g["params"]]
    out[f"{precision}-{stage}"] = {
        "optimizer": type(opt).__name__,
        "separate_master": bool(masters) and all(m.data_ptr() not in params for m in masters),
        "master_dtype": str(masters[0].dtype),
    }
print("RESULT " + json.dumps(out))
"""


@pytest.mark.distributed
def test_master_copy_exists_exactly_where_the_planner_counts_one():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), DS_ACCELERATOR="cpu", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    built = json.loads(lines[-1][len("RESULT "):])

    from tests.conftest import tiny_arch

    for precision, stage in CASES:
        got = built[f"{precision}-{stage}"]
        shape = Shape.of(tiny_arch(), 128, precision)
        planned = master_weights_bytes(shape, Layout(num_gpus=1, zero_stage=stage))
        assert got["separate_master"] == (planned > 0), (precision, stage, got, planned)
        assert got["master_dtype"] == "torch.float32"
    # ZeRO-0: DeepSpeed wraps torch AdamW in FP16_UnfusedOptimizer for bf16 (not BF16_Optimizer)
    assert built["bf16-0"]["optimizer"] == "FP16_UnfusedOptimizer"
    assert built["fp32-0"]["optimizer"] == "AdamW"
