"""QLoRA on CUDA: a tiny model's decoder linear layers in 4 bits (bitsandbytes), peft adapters on
them, a few steps of one trainer process (GPU only; skipped without CUDA or bitsandbytes).

Run on a GPU machine: ``python -m pytest tests/test_lora_qlora_gpu.py`` (``pytest -m gpu``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes"),
]

QLORA = {"kind": "qlora", "lora_rank": 4, "lora_alpha": 8, "quant_type": "nf4", "double_quant": True,
         "quant_storage": "uint8", "export_merged": True}


def _plan_dict(**layout) -> dict:
    from _launch import tiny_plan_dict

    plan = tiny_plan_dict(layout={"num_gpus": 1, "zero_stage": 2, **layout},
                          training={"precision": "bf16", "learning_rate": 0.01, "max_steps": 6})
    plan["hardware"]["gpu"] = "h100-80g"
    plan["method"] = dict(QLORA)
    return plan


def test_qlora_model_quantizes_decoder_linears_and_trains():
    """Every decoder linear layer is a peft lora.Linear4bit around a bitsandbytes Linear4bit whose
    packed weight never changes; the adapters (only they) get gradients and the loss falls."""
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from ltune.planner.schema import Plan
    from ltune.trainer.model import build_model

    torch.cuda.set_device(0)
    plan = Plan.model_validate(_plan_dict())
    model = build_model(plan)
    lm = model.lm
    wrapped = [m for m in lm.modules() if isinstance(m, LoraLinear4bit)]
    assert len(wrapped) == 2 * 7
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in wrapped)
    assert type(lm.lm_head).__name__ == "LossHead"  # the head stays in bf16
    packed = {id(m): m.base_layer.weight.data.clone() for m in wrapped}
    trainable = [p for p in lm.parameters() if p.requires_grad]
    assert trainable and all(p.is_floating_point() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=0.01)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (1, 128), generator=gen).cuda()
    pos = torch.arange(128, device="cuda")[None]
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    losses = []
    for _ in range(6):
        loss_sum, n = model(ids, pos, labels)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss_sum / n))
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(m.base_layer.weight.data, packed[id(m)]) for m in wrapped)


def test_qlora_trainer_run_exports_adapter_and_merged(tmp_path):
    """One trainer process (ZeRO-2, bf16): the loss falls; adapter/ loads with peft onto the
    dequantized base; hf_model/ is the merged model in bf16."""
    from _launch import REPO, env, read_metrics, write_plan
    from conftest import free_port
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    write_plan(run_dir / "plan.yaml", _plan_dict())
    e = env(tmp_path / "cache") | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-m", "ltune.trainer", str(run_dir)], env=e, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert losses[-1] < losses[0], losses
    adapter = load_file(Path(run_dir) / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 2 * 7
    merged = load_file(Path(run_dir) / "hf_model" / "model.safetensors")
    assert merged["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert not any(".lora_" in k or "base_layer" in k for k in merged)
