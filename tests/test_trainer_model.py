"""Building the model: pretrained safetensors weights land in the ZeRO-3 partitions intact
(tied models too, from checkpoints without ``lm_head.weight``), and ZeRO 0-2 builds in the
plan's dtype the weights a plain fp32 ``from_config`` gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from _launch import REPO, tiny_plan_dict
from conftest import free_port as _free_port, make_plan, tiny_arch

SCRIPT = r"""
import json, os, sys
import torch, deepspeed
from safetensors import safe_open
from ltune.planner.schema import Plan
from ltune.job.ds_config import build_ds_config
from ltune.trainer.model import build_model

deepspeed.init_distributed()
out = {}
for case, plan_dict in json.loads(sys.argv[1]).items():
    plan = Plan.model_validate(plan_dict)
    model = build_model(plan, build_ds_config(plan))
    with safe_open(os.path.join(plan.model.path, "model.safetensors"), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    worst, names, partitioned = 0.0, [], True
    for name, param in model.lm.named_parameters(remove_duplicate=False):
        partitioned &= hasattr(param, "ds_id")
        names.append(name)
        key = name if name in saved else "model.embed_tokens.weight"  # the tied head is the embedding
        with deepspeed.zero.GatheredParameters([param]):
            worst = max(worst, (param.float() - saved[key].float()).abs().max().item())
    lm = model.lm
    out[case] = {
        "worst": worst, "saved": sorted(saved), "names": sorted(names), "partitioned": partitioned,
        "same_object": lm.lm_head.weight is lm.model.embed_tokens.weight,
        "attn": lm.config._attn_implementation,
    }
print("RESULT " + json.dumps(out))
"""


def _save_hf(folder, plan: dict, tie: bool, dtype) -> dict:
    """The plan's architecture as a transformers checkpoint (save_pretrained), seeded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(plan["model"]["architecture"])
    hf = {k: v for k, v in arch.items() if k in ("hidden_size", "intermediate_size", "vocab_size")}
    config = AutoConfig.for_model(
        "llama", num_hidden_layers=arch["num_layers"], num_attention_heads=arch["num_attention_heads"],
        num_key_value_heads=arch["num_kv_heads"], tie_word_embeddings=tie, **hf,
    )
    torch.manual_seed(11 + tie)
    AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(folder)
    plan = json.loads(json.dumps(plan))
    plan["model"]["path"] = str(folder)
    plan["model"]["architecture"]["tie_word_embeddings"] = tie
    return plan


def test_pretrained_weights_load_into_zero3_partitions(tmp_path):
    """One 1-process DeepSpeed world (the example's fp32 partitions): an untied checkpoint saved
    in fp32, and a tied one saved in bf16 without lm_head.weight (as transformers saves tied
    models; qwen2.5-0.5b, llama3.2-1b): the same weights exactly, and the output head is the
    embedding's parameter."""
    base = tiny_plan_dict(layout={"num_gpus": 1, "zero_stage": 3})
    plans = {
        "untied": _save_hf(tmp_path / "untied", base, tie=False, dtype=torch.float32),
        "tied": _save_hf(tmp_path / "tied", base, tie=True, dtype=torch.bfloat16),
    }
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(plans)], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, **env}, timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
    untied, tied = result["untied"], result["tied"]
    # 2 layers x 9 tensors, the final norm, the embedding and the head
    assert untied["names"] == untied["saved"] and len(untied["saved"]) == 21
    assert untied["partitioned"] and not untied["same_object"]
    assert untied["attn"] == "ltune_varlen"
    assert untied["worst"] == 0.0, untied
    assert "lm_head.weight" not in tied["saved"] and len(tied["saved"]) == 20
    assert tied["names"] == sorted(tied["saved"] + ["lm_head.weight"])
    assert tied["partitioned"] and tied["same_object"]
    assert tied["worst"] == 0.0, tied


def _from_config_reference(plan, seed: int) -> dict:
    """What ZeRO 0-2 built before: a plain fp32 from_config on the CPU, seeded, then cast by
    DeepSpeed to the plan's dtype; with the generator's next draw."""
    from transformers import AutoModelForCausalLM

    from ltune.trainer.model import attn_implementation, hf_config, torch_dtype

    torch.manual_seed(seed)
    ref = AutoModelForCausalLM.from_config(hf_config(plan, attn_implementation(plan)))
    dtype = torch_dtype(plan.training.precision)
    state = {k: v.to(dtype) for k, v in ref.state_dict().items()}
    return {"state": state, "inv_freq": ref.model.rotary_emb.inv_freq.clone(), "next": torch.rand(4)}


def test_zero_1_2_builds_in_the_plan_dtype_with_the_fp32_weights():
    """ZeRO 0-2 random init: no fp32 model on the host, but the same weights bit for bit as an
    fp32 CPU build (cast to bf16 for a bf16 plan), untied and tied, and the generator left
    where that build leaves it (the constructors' draws are replayed)."""
    from ltune.trainer.model import build_model

    for tie, precision, dtype in ((False, "fp32", torch.float32), (True, "bf16", torch.bfloat16)):
        plan = make_plan(arch=tiny_arch(tie_word_embeddings=tie), layout={"num_gpus": 1, "zero_stage": 2},
                         training={"precision": precision, "seed": 5})
        ref = _from_config_reference(plan, 5)
        lm = build_model(plan, {}).lm
        after = torch.rand(4)
        state = lm.state_dict()
        assert sorted(state) == sorted(ref["state"])
        assert {v.dtype for v in state.values()} == {dtype}
        differ = [k for k, v in ref["state"].items() if not torch.equal(v, state[k])]
        assert differ == [], (tie, precision, differ)
        assert torch.equal(lm.model.rotary_emb.inv_freq, ref["inv_freq"])
        assert torch.equal(after, ref["next"])
        assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == tie
    with torch.device("meta"):  # the tracer's meta build stays on meta
        assert next(build_model(plan).parameters()).is_meta


def test_zero_1_2_loads_pretrained_into_the_plan_dtype(tmp_path):
    """ZeRO 0-2 with model.path: transformers loads the checkpoint into the plan's dtype on the
    device (here the CPU); a tied bf16 checkpoint without lm_head.weight, read into fp32."""
    from ltune.trainer.model import build_model

    base = tiny_plan_dict(layout={"num_gpus": 1, "zero_stage": 2})
    plan_dict = _save_hf(tmp_path / "tied", base, tie=True, dtype=torch.bfloat16)
    from ltune.planner.schema import Plan
    from safetensors.torch import load_file

    lm = build_model(Plan.model_validate(plan_dict), {}).lm
    saved = load_file(str(tmp_path / "tied" / "model.safetensors"))
    state = lm.state_dict()
    assert "lm_head.weight" not in saved and lm.lm_head.weight is lm.model.embed_tokens.weight
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert [k for k, v in saved.items() if not torch.equal(state[k], v.float())] == []
    ref = _from_config_reference(Plan.model_validate(plan_dict), 0)  # RoPE's buffer, made on the CPU
    assert torch.equal(lm.model.rotary_emb.inv_freq, ref["inv_freq"])
