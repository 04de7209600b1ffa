"""Building the model: pretrained safetensors weights land in the ZeRO-3 partitions intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from _launch import REPO, tiny_plan_dict
from conftest import free_port as _free_port

SCRIPT = r"""
import json, os, sys
import torch, deepspeed
from safetensors.torch import load_file
from ltune.planner.schema import Plan
from ltune.job.ds_config import build_ds_config
from ltune.trainer.model import build_model

plan = Plan.model_validate(json.loads(sys.argv[1]))
deepspeed.init_distributed()
ds_config = build_ds_config(plan)
model = build_model(plan, ds_config)
saved = load_file(os.path.join(plan.model.path, "model.safetensors"))
worst = 0.0
for name, param in model.lm.named_parameters():
    assert hasattr(param, "ds_id"), name  # partitioned
    with deepspeed.zero.GatheredParameters([param]):
        worst = max(worst, (param.float() - saved[name].float()).abs().max().item())
print(json.dumps({"worst": worst, "count": len(saved), "attn": model.lm.config._attn_implementation}))
"""


def test_pretrained_weights_load_into_zero3_partitions(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    plan = tiny_plan_dict(layout={"num_gpus": 1, "zero_stage": 3})
    arch = dict(plan["model"]["architecture"])
    hf = {k: v for k, v in arch.items() if k in ("hidden_size", "intermediate_size", "vocab_size")}
    config = AutoConfig.for_model(
        "llama", num_hidden_layers=arch["num_layers"], num_attention_heads=arch["num_attention_heads"],
        num_key_value_heads=arch["num_kv_heads"], **hf,
    )
    torch_model = AutoModelForCausalLM.from_config(config)
    torch_model.save_pretrained(tmp_path / "hf")
    plan["model"]["path"] = str(tmp_path / "hf")
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(plan)], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, **env}, timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["count"] == len(list(torch_model.parameters()))
    assert result["attn"] == "ltune_varlen"
    # ZeRO-3 keeps bf16 partitions: the loaded weights are the saved ones rounded to bf16
    assert result["worst"] <= 2 ** -8 * 0.2, result
