"""--method and its options through the command line: plan.yaml's method block, `ltune check` of
an adapter plan, --json's trainable parameters against a hand count, sweep and trace carrying the
method, and one-line errors (exit 2) for bad method flags. No exact memory bytes: the adapters'
memory terms are their own tests' business."""

from __future__ import annotations

import json

import pytest
import yaml
from _fuzz import one_line
from typer.testing import CliRunner

import ltune.trace
from ltune.cli import app

runner = CliRunner()

# Llama-3.1-8B, rank 16 on all seven linear layers of its 32 decoder layers: 16 x (in + out) each,
# q 4096+4096, k and v 4096+1024, o 4096+4096, gate and up 4096+14336, down 14336+4096
# (peft's print_trainable_parameters: "trainable params: 41,943,040 || all params: 8,072,204,288")
LLAMA8B_R16_ALL = 32 * 16 * (8192 + 2 * 5120 + 8192 + 3 * 18432)
LLAMA8B_PARAMS = 8_030_261_248
PLAN_8B = ["plan", "-m", "llama3.1-8b", "--ctx", "8k", "--gpu", "a100-80g"]


def _json(args: list[str]) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _error(args: list[str]) -> str:
    """The command's one error line; exit 2, no traceback."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert one_line(result.stderr) and result.stderr.startswith("error:"), result.stderr
    return result.stderr


def test_hand_count_is_peft_figure():
    assert LLAMA8B_R16_ALL == 41_943_040 == 8_072_204_288 - LLAMA8B_PARAMS


def test_json_trainable_params(tmp_path):
    out = _json([*PLAN_8B, "--method", "lora"])
    assert (out["method"], out["params"], out["trainable_params"]) == ("lora", LLAMA8B_PARAMS, LLAMA8B_R16_ALL)
    assert out["method_config"]["lora_rank"] == 16 and out["method_config"]["lora_targets"] is None
    assert all(ev["trainable_params"] == LLAMA8B_R16_ALL for ev in out["runners_up"])
    assert all(pc["best"]["trainable_params"] == LLAMA8B_R16_ALL for pc in out["per_count"] if pc["best"])
    # rank 8 on q and v only: 8 x (4096 + 4096) + 8 x (4096 + 1024) per layer
    two = _json([*PLAN_8B, "--method", "lora", "--lora-rank", "8", "--lora-targets", "q_proj, v_proj"])
    assert two["trainable_params"] == 32 * (8 * 8192 + 8 * 5120) == 3_407_872
    assert two["method_config"]["lora_targets"] == ["q_proj", "v_proj"]
    full = _json(PLAN_8B)
    assert (full["method"], full["trainable_params"]) == ("full", LLAMA8B_PARAMS)
    # QLoRA: every decoder linear weight in 4 bits with double quantization, about 4.127 bits each
    q = _json([*PLAN_8B, "--method", "qlora"])
    linear = 32 * (4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert q["trainable_params"] == LLAMA8B_R16_ALL
    assert q["quantized_bytes"] == pytest.approx(linear * 4.127 / 8, rel=1e-3)
    # adapters train faster than every weight on the same layout (frozen weights: no weight gradients)
    lay = ["--gpus", "8", "--zero-stage", "2", "--recompute", "full", "--micro-batch", "1", "--offload", "none",
           "--sp-degree", "1", "--loss", "chunked"]
    full_tps = _json([*PLAN_8B, *lay])["throughput"]["tokens_per_s_per_gpu"]
    lora_tps = _json([*PLAN_8B, *lay, "--method", "lora"])["throughput"]["tokens_per_s_per_gpu"]
    # by less than the matmul FLOPs (8 vs 6 per frozen weight with recompute, about 1.33x): attention and
    # the memory-bound work are the same for both
    assert 1.0 < lora_tps / full_tps < 8 / 6


def test_plan_yaml_method_block_and_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [*PLAN_8B, "--method", "lora", "--lora-rank", "8", "--lora-alpha", "16",
                                 "--lora-targets", "q_proj,v_proj", "--export-merged", "-o", "plan.yaml"])
    assert result.exit_code == 0, result.output
    assert "3,407,872 trainable parameters" in result.stdout
    method = yaml.safe_load((tmp_path / "plan.yaml").read_text())["method"]
    assert method["kind"] == "lora" and method["lora_rank"] == 8 and method["lora_alpha"] == 16
    assert method["lora_targets"] == ["q_proj", "v_proj"] and method["export_merged"] is True
    check = runner.invoke(app, ["check", "plan.yaml", "--format", "json"])
    assert check.exit_code == 0, check.output
    (only,) = json.loads(check.stdout)["results"]
    # re-judged with the plan's method: today's total is the stored one (as full fine-tuning it is not)
    assert only["verdict"] == "fits" and only["drift_pct"] == pytest.approx(0.0, abs=1e-9)
    full = runner.invoke(app, [*PLAN_8B, "-o", "full.yaml"])
    assert full.exit_code == 0
    assert yaml.safe_load((tmp_path / "full.yaml").read_text())["method"]["kind"] == "full"


def test_qlora_plan_text_states_4bit_bytes():
    result = runner.invoke(app, [*PLAN_8B, "--method", "qlora", "--no-double-quant", "--quant-type", "fp4"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "QLoRA rank 16" in text and "41,943,040 trainable parameters" in text
    assert "frozen in 4 bits (fp4)" in text and "GiB for 6.98B weights" in text


@pytest.mark.parametrize("args, words", [
    (["--method", "lora", "--lora-targets", "foo_proj"], ["--lora-targets", "'foo_proj'", "q_proj"]),
    (["--method", "qlora", "--zero-stage", "3"], ["--zero-stage", "qlora", "(got 3)"]),
    (["--method", "qlora", "--offload", "all"], ["--offload all", "qlora"]),
    (["--method", "dora"], ["--method", "full, lora, qlora", "'dora'"]),
    (["--method", "lora", "--lora-rank", "0"], ["--lora-rank", "(got 0)"]),
    (["--method", "lora", "--lora-dropout", "1"], ["--lora-dropout", "(got 1.0)"]),
    (["--method", "lora", "--lora-targets", ","], ["--lora-targets", "','"]),
    (["--method", "lora", "--lora-targets", "q-proj"], ["--lora-targets", "'q-proj'"]),
    (["--method", "qlora", "--quant-type", "int8"], ["--quant-type", "nf4, fp4", "'int8'"]),
    (["--method", "qlora", "--quant-storage", "fp32"], ["--quant-storage", "'fp32'"]),
    (["--method", "lora", "--quant-type", "nf4"], ["--quant-type", "qlora", "--method lora"]),
    (["--lora-rank", "8"], ["--lora-rank", "--method full"]),
])
def test_bad_method_flags_one_line(args, words):
    line = _error([*PLAN_8B, *args])
    for word in words:
        assert word in line, line


def test_ctx_max_with_lora():
    out = _json(["plan", "-m", "llama3.1-8b", "--ctx", "max", "--gpu", "rtx4090", "--gpus", "1", "--method", "lora"])
    assert out["method"] == "lora" and out["fits"]
    assert out["longest_context"]["seq_len"] >= 8192 and out["seq_len"] == out["longest_context"]["seq_len"]


def test_sweep_carries_the_method():
    out = _json(["sweep", "-m", "llama3.1-8b", "--ctx", "8k", "--gpu", "a100-80g", "--method", "lora"])
    assert (out["method"], out["trainable_params"]) == ("lora", LLAMA8B_R16_ALL)
    assert out["cells"][0]["fits"] and out["cells"][0]["trainable_params"] == LLAMA8B_R16_ALL
    assert _error(["sweep", "-m", "llama3.1-8b", "--ctx", "8k", "--method", "lora", "--lora-targets", "x"])


@pytest.fixture
def stub_trace(monkeypatch):
    """trace_memory replaced by a stub that reports the method it was given as an error line."""
    def traced(*args, method=None, plan=None, **kwargs):
        raise ValueError(f"traced method={method.kind if method else None} plan={plan.method.kind if plan else None}")

    monkeypatch.setattr(ltune.trace, "trace_memory", traced)


def test_trace_passes_the_method(stub_trace, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    line = _error(["trace", "-m", "qwen2.5-0.5b", "--ctx", "4k", "--gpus", "1", "--method", "lora"])
    assert "traced method=lora plan=None" in line
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["plan", "-m", "qwen2.5-0.5b", "--ctx", "4k", "--method", "qlora", "-o", "p.yaml"]).exit_code == 0
    assert "traced method=qlora plan=qlora" in _error(["trace", "--plan", "p.yaml"])
    assert "--method" in _error(["trace", "--plan", "p.yaml", "--method", "lora"])


def test_conventional_recipe_for_qlora_is_one_qlora_runs():
    """The conventional line must name a layout the plan could use: QLoRA runs at ZeRO 0-2, so its
    conventional recipe is ZeRO-2 (a ZeRO-3 one would be refused by plan -o, check and launch)."""
    from ltune.planner.schema import Method
    from ltune.planner.search import Request, search
    from ltune.profiles import load_gpu, load_model

    req = Request(model=load_model("llama3.2-1b"), gpu=load_gpu("a100-80g"), seq_len=8192, method=Method(kind="qlora"))
    conv = search(req).conventional
    assert conv is not None and conv.layout.zero_stage == 2
    full = search(req.model_copy(update={"method": Method()})).conventional
    assert full is not None and full.layout.zero_stage == 3
