"""LoRA in the trainer: adapters train, the base does not, resume is exact, the exports load.

CPU parts (no processes): peft's LoraConfig from the plan, the decoder linear layers QLoRA would
quantize, the merge formula against peft's own merge, and the refusal of a qlora plan where it
cannot run (through `ltune launch`: exit 2, one line, nothing written).

Runs (marked distributed):
- one 2-process `ltune launch` (ZeRO-3, Ulysses sp 2, chunked loss, varlen attention, a pretrained
  base folder, export_merged) and its resume from the middle checkpoint: the loss falls; the
  merged export equals the base outside the adapted weights and base + B A alpha/r on them (so
  only the adapters changed); peft loads the adapter folder onto the base and gives the merged
  model's logits; the checkpoint holds no frozen weight; steps 5..8 of the resume log the same
  losses bit for bit, and the same adapter;
- one process (gloo world of 1, started directly) at ZeRO 0 and 2: 4 steps, a checkpoint at 2,
  then a resume from it reproduces steps 3..4 and the adapter exactly.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _launch import REPO, env, launch, launch_argv, read_metrics, tiny_plan_dict, write_plan
from conftest import free_port

LORA = {"kind": "lora", "lora_rank": 4, "lora_alpha": 8, "export_merged": True}
#: alpha / r of LORA (peft LoraLayer.scaling)
SCALE = 8 / 4
#: one decoder layer of the tiny llama: q k v o gate up down
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _plan_dict(base: Path | None, method: dict = LORA, **sections) -> dict:
    plan = tiny_plan_dict(**sections)
    plan["training"].update(precision="fp32", learning_rate=0.01)
    if base is not None:
        plan["model"]["path"] = str(base)
    plan["method"] = dict(method)
    return plan


def _plan(plan_dict: dict):
    from ltune.planner.schema import Plan

    return Plan.model_validate(plan_dict)


def _tail(result) -> str:
    return (result.stdout + result.stderr)[-3000:]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A pretrained base of the tiny plan's shape: transformers' own random init, saved as safetensors."""
    from transformers import AutoModelForCausalLM

    from ltune.trainer.model import hf_config

    folder = tmp_path_factory.mktemp("base") / "model"
    config = hf_config(_plan(_plan_dict(None)), "eager")
    torch.manual_seed(123)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- CPU parts


def test_lora_config_and_targets():
    from ltune.trainer.lora import lora_config

    config = lora_config(_plan(_plan_dict(None)))
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (4, 8, 0.0, "none")
    assert sorted(config.target_modules) == sorted(LINEARS)
    some = _plan(_plan_dict(None, {"kind": "lora", "lora_targets": ["v_proj", "q_proj"]}))
    assert sorted(lora_config(some).target_modules) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="'x_proj' is not a linear layer"):
        _plan(_plan_dict(None, {"kind": "lora", "lora_targets": ["x_proj"]}))


def test_adapters_and_quantized_layers_on_a_built_model():
    """Adapters on the named layers only, everything else frozen; QLoRA's layers: every decoder
    linear layer (2 layers x 7), never the output head."""
    from transformers import AutoModelForCausalLM

    from ltune.trainer.lora import apply_adapters, decoder_linears, peft_key
    from ltune.trainer.model import hf_config

    plan = _plan(_plan_dict(None, {"kind": "lora", "lora_rank": 4, "lora_targets": ["q_proj", "down_proj"]}))
    lm = AutoModelForCausalLM.from_config(hf_config(plan, "eager"))
    linears = decoder_linears(lm, plan)
    assert len(linears) == 2 * 7 and "lm_head" not in linears
    assert sorted({n.rpartition(".")[2] for n in linears}) == sorted(LINEARS)
    apply_adapters(lm, plan)
    trainable = {n: p.numel() for n, p in lm.named_parameters() if p.requires_grad}
    # r (in + out) per adapted layer: q_proj 64 -> 64, down_proj 128 -> 64
    assert sum(trainable.values()) == 2 * 4 * ((64 + 64) + (128 + 64))
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert peft_key("model.layers.1.mlp.down_proj.lora_B.default.weight") == \
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"


def test_merged_weight_is_peft_merge():
    """Our merge (W + B A alpha/r) against peft's own merge of the same layer."""
    from peft import LoraConfig, inject_adapter_in_model

    from ltune.trainer.lora import merged_weight

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40))
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=12, target_modules=["0"]), model)
    layer = model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    w, a, b = (t.detach().clone() for t in (layer.base_layer.weight, layer.lora_A["default"].weight,
                                            layer.lora_B["default"].weight))
    layer.merge()
    assert torch.allclose(merged_weight(w, a, b, 12 / 4), layer.base_layer.weight, atol=1e-6)
    assert not torch.allclose(w, layer.base_layer.weight, atol=1e-3)


def test_merged_export_dequantizes_4bit_layers_without_an_adapter(monkeypatch):
    """QLoRA stores every decoder linear layer in 4 bits, adapted or not: the merged export writes
    each one dequantized at its (out, in) shape, never the packed bytes. bitsandbytes is CUDA-only,
    so a stand-in: k_proj's weight is a packed uint8 tensor with a quant_state, and dequantization
    gives a known tensor."""
    from transformers import AutoModelForCausalLM

    from ltune.trainer import lora
    from ltune.trainer.export import Computed, merged_tensors
    from ltune.trainer.model import hf_config

    plan = _plan(_plan_dict(None, {"kind": "lora", "lora_rank": 4, "lora_targets": ["q_proj"]}))
    lm = AutoModelForCausalLM.from_config(hf_config(plan, "eager"))
    k_proj = lm.model.layers[0].self_attn.k_proj
    packed = torch.nn.Parameter(torch.zeros(k_proj.weight.numel() // 2, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = object()
    k_proj.weight, k_proj.compute_dtype = packed, torch.bfloat16
    known = torch.full((k_proj.out_features, k_proj.in_features), 0.5)
    monkeypatch.setattr(lora, "dequantized", lambda w: known if getattr(w, "quant_state", None) else w)
    lora.apply_adapters(lm, plan)
    out = dict(merged_tensors(lm, plan))
    written = out["model.layers.0.self_attn.k_proj.weight"]
    assert isinstance(written, Computed) and tuple(written.shape) == tuple(known.shape)
    assert written.dtype == torch.bfloat16
    assert torch.equal(written.fn(*written.sources), known.to(torch.bfloat16))


def test_qlora_refusal_reasons():
    from ltune.job.methods import unrunnable_reason

    gpu_plan = _plan(_plan_dict(None, {"kind": "qlora"}, layout={"zero_stage": 2}) | {"hardware": {"gpu": "a100-80g"}})
    cpu_plan = _plan(_plan_dict(None, {"kind": "qlora"}, layout={"zero_stage": 2}))
    assert "cpu target" in unrunnable_reason(cpu_plan, cuda_devices=8, has_bitsandbytes=True)
    assert "no CUDA device" in unrunnable_reason(gpu_plan, cuda_devices=0, has_bitsandbytes=True)
    assert "bitsandbytes" in unrunnable_reason(gpu_plan, cuda_devices=8, has_bitsandbytes=False)
    assert unrunnable_reason(gpu_plan, cuda_devices=8, has_bitsandbytes=True) is None
    assert unrunnable_reason(gpu_plan, local=False) is None  # a slurm job runs elsewhere
    assert unrunnable_reason(_plan(_plan_dict(None)), cuda_devices=0) is None  # lora runs anywhere


@pytest.mark.parametrize("gpu, reason", [("cpu", "the plan's target is the cpu target"),
                                          ("a100-80g", "this machine has no CUDA device")])
def test_launch_refuses_qlora_without_cuda(tmp_path, gpu, reason):
    from ltune.job.methods import cuda_device_count

    if gpu != "cpu" and cuda_device_count() > 0:
        pytest.skip("this machine has CUDA")
    plan = _plan_dict(None, {"kind": "qlora"}, layout={"zero_stage": 2})
    plan["hardware"]["gpu"] = gpu
    plan_file = write_plan(tmp_path / "plan.yaml", plan)
    run_dir = tmp_path / "run"
    result = subprocess.run(launch_argv(plan_file, run_dir), env=env(tmp_path / "cache"), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, _tail(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and reason in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not run_dir.exists()  # nothing written, nothing started


def test_dry_run_of_a_qlora_plan_works_without_cuda(tmp_path):
    """--dry-run on a login or CI machine without CUDA shows the GPU job's command (exit 0); a
    qlora plan for the cpu target is still refused, dry or not."""
    plan = _plan_dict(None, {"kind": "qlora"}, layout={"zero_stage": 2})
    plan["hardware"]["gpu"] = "a100-80g"
    plan_file = write_plan(tmp_path / "plan.yaml", plan)
    argv = [*launch_argv(plan_file, tmp_path / "run"), "--dry-run"]
    result = subprocess.run(argv, env=env(tmp_path / "cache"), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, _tail(result)
    plan["hardware"]["gpu"] = "cpu"
    cpu_file = write_plan(tmp_path / "cpu.yaml", plan)
    argv = [*launch_argv(cpu_file, tmp_path / "run2"), "--dry-run"]
    result = subprocess.run(argv, env=env(tmp_path / "cache"), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "cpu target" in result.stderr, _tail(result)


# ---------------------------------------------------------------- runs


def _checkpoint_keys(step_dir: Path) -> set[str]:
    keys = set()
    for f in step_dir.glob("*model_states.pt"):
        keys |= set(torch.load(f, map_location="cpu", weights_only=False)["module"])
    return keys


@pytest.mark.distributed
def test_lora_zero3_sp_run_exports_and_resumes(tmp_path, base):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    plan = _plan_dict(base, layout={"zero_stage": 3, "sp_degree": 2, "micro_batch_size": 2, "loss": "chunked"},
                      training={"max_steps": 8, "checkpoint_every": 4, "loss_chunk_tokens": 64})
    plan_file = write_plan(tmp_path / "plan.yaml", plan)
    run_dir = tmp_path / "run"
    first = launch(plan_file, run_dir, tmp_path / "cache")
    assert first.returncode == 0, _tail(first)
    metrics = read_metrics(run_dir)
    losses = [m["loss"] for m in metrics]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert losses[-1] < losses[0] - 0.15, losses  # 6.28 -> 6.03 here: adapters alone, 8 steps

    # peft loads the adapter folder onto the base and gives the trained (merged) model's logits
    ids = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run_dir / "adapter").eval()
        peft_logits = peft_model(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model").eval()(ids).logits
    assert (peft_logits - base_logits).abs().max() > 1e-2
    assert torch.allclose(peft_logits, merged_logits, atol=1e-4), (peft_logits - merged_logits).abs().max()

    # only the adapters changed: the merged export is the base, plus B A alpha/r where adapted
    before = load_file(base / "model.safetensors")
    after = load_file(run_dir / "hf_model" / "model.safetensors")
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert after.keys() == before.keys()
    adapted = 0
    for name, w in before.items():
        module, _, _ = name.rpartition(".")
        a_key = f"base_model.model.{module}.lora_A.weight"
        if a_key in adapter:
            delta = adapter[f"base_model.model.{module}.lora_B.weight"] @ adapter[a_key] * SCALE
            assert delta.abs().max() > 1e-4, name  # the adapter trained
            assert torch.allclose(after[name], w + delta, atol=1e-5), name
            adapted += 1
        else:
            assert torch.equal(after[name], w), name  # frozen: bit for bit
    assert adapted == 2 * 7 and len(adapter) == 2 * adapted

    # the checkpoint holds the adapters, no frozen weight
    ckpts = run_dir / "checkpoints"
    keys = _checkpoint_keys(ckpts / "step_4")
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), sorted(keys)[:4]

    # resume from step 4 as if the job had died after it: steps 5..8 again, bit for bit
    shutil.rmtree(ckpts / "step_8")
    shutil.rmtree(run_dir / "adapter")
    resumed = launch(plan_file, run_dir, tmp_path / "cache", "--resume")
    assert resumed.returncode == 0, _tail(resumed)
    assert "resume: continuing after step 4" in resumed.stdout + resumed.stderr
    again = read_metrics(run_dir)
    assert [m["loss"] for m in again] == losses
    assert [m["grad_norm"] for m in again] == [m["grad_norm"] for m in metrics]
    resumed_adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(resumed_adapter[k], v) for k, v in adapter.items())


def _run_one(run_dir: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    e = env(cache) | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return subprocess.run([sys.executable, "-m", "ltune.trainer", str(run_dir), *extra],
                          env=e, cwd=REPO, capture_output=True, text=True, timeout=240)


@pytest.mark.distributed
@pytest.mark.parametrize("zero_stage", [0, 2])  # ZeRO-1 passes too (as ZeRO-2 less gradient partitioning)
def test_lora_one_process_resumes_exactly(tmp_path, base, zero_stage):
    from safetensors.torch import load_file

    plan = _plan_dict(base, layout={"num_gpus": 1, "zero_stage": zero_stage},
                      training={"max_steps": 4, "checkpoint_every": 2})
    plan["method"]["export_merged"] = False
    run_dir = tmp_path / "run"
    write_plan(run_dir / "plan.yaml", plan)
    first = _run_one(run_dir, tmp_path / "cache")
    assert first.returncode == 0, _tail(first)
    metrics = read_metrics(run_dir)
    assert metrics[-1]["loss"] < metrics[0]["loss"], metrics
    assert not (run_dir / "hf_model").exists()  # export_merged off: the adapter folder only
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(".lora_A." in k or ".lora_B." in k for k in _checkpoint_keys(run_dir / "checkpoints" / "step_2"))

    shutil.rmtree(run_dir / "checkpoints" / "step_4")
    resumed = _run_one(run_dir, tmp_path / "cache", "--resume")
    assert resumed.returncode == 0, _tail(resumed)
    assert "resume: continuing after step 2" in resumed.stdout + resumed.stderr
    again = read_metrics(run_dir)
    assert [(m["loss"], m["grad_norm"]) for m in again] == [(m["loss"], m["grad_norm"]) for m in metrics]
    resumed_adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(resumed_adapter[k], v) for k, v in adapter.items())
