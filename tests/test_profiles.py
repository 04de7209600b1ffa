"""Model and GPU profiles: every file loads, counts match published sizes, lookups fail helpfully."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ltune.profiles import (
    GpuProfile,
    ModelProfile,
    ProfileError,
    gpu_names,
    load_gpu,
    load_model,
    model_from_hf_config,
    model_names,
    resolve_model,
)

DATA = Path(__file__).parent / "data"
PROFILES = Path(__file__).parent.parent / "ltune" / "profiles"
MIB = 2**20

# Published parameter counts. Sources: the "Model size ... params" figure on each model's
# Hugging Face page (safetensors metadata) for InternLM2, Llama 2, Llama 3.1, Mistral and Yi;
# the "Number of Parameters" line of the Qwen2.5 model cards (Qwen/Qwen2.5-*).
PUBLISHED_PARAMS = {
    "internlm2-1.8b": 1.89e9,
    "internlm2-7b": 7.74e9,
    "internlm2-20b": 19.9e9,
    "llama2-7b": 6.74e9,
    "llama2-13b": 13.0e9,
    "llama2-70b": 69.0e9,
    "llama3.1-8b": 8.03e9,
    "llama3.1-70b": 70.6e9,
    "qwen2.5-0.5b": 0.49e9,
    "qwen2.5-1.5b": 1.54e9,
    "qwen2.5-7b": 7.61e9,
    "qwen2.5-14b": 14.7e9,
    "qwen2.5-32b": 32.5e9,
    "qwen2.5-72b": 72.7e9,
    "mistral-7b": 7.24e9,
    "yi-34b": 34.4e9,
}

EXPECTED_GPUS = {
    "a100-40g", "a100-80g", "a800-80g", "h100-80g", "h100-pcie", "h800", "h20", "h200",
    "l40s", "l20", "a10", "rtx3090", "rtx4090", "v100-32g", "b200", "mi300x", "cpu",
}


def test_every_listed_model_and_gpu_has_a_profile():
    assert set(model_names()) == set(PUBLISHED_PARAMS)
    assert set(gpu_names()) == EXPECTED_GPUS


@pytest.mark.parametrize("name", model_names())
def test_model_profile_loads_and_matches_published_size(name):
    model = load_model(name)
    assert isinstance(model, ModelProfile)
    assert model.name == name == (PROFILES / "models" / f"{name}.json").stem
    assert model.source.strip() and not model.generic
    assert model.num_attention_heads % model.num_kv_heads == 0
    assert model.head_size * model.num_attention_heads == model.hidden_size
    published = PUBLISHED_PARAMS[name]
    assert abs(model.num_params() - published) / published < 0.03, (model.num_params(), published)


def test_tied_embeddings_and_qkv_bias_count():
    """Qwen2.5-0.5B: tied head (no second vocab x hidden matrix) and q/k/v biases."""
    small = load_model("qwen2.5-0.5b")
    assert small.tie_word_embeddings and small.attention_bias
    untied = small.model_copy(update={"tie_word_embeddings": False})
    assert untied.num_params() - small.num_params() == small.vocab_size * small.hidden_size
    no_bias = small.model_copy(update={"attention_bias": False})
    per_layer_bias = small.q_size + 2 * small.kv_size
    assert small.num_params() - no_bias.num_params() == small.num_layers * per_layer_bias


@pytest.mark.parametrize("name", gpu_names())
def test_gpu_profile_loads_with_sane_units(name):
    gpu = load_gpu(name)
    assert isinstance(gpu, GpuProfile)
    assert gpu.name == name == (PROFILES / "gpus" / f"{name}.json").stem
    assert gpu.display_name.strip() and gpu.source.strip()
    # bytes, a whole number of MiB as the runtime reports it, not a marketed "80 GB"
    assert gpu.hbm_bytes % MIB == 0
    assert 4 * 2**30 < gpu.hbm_bytes < 256 * 2**30
    assert gpu.fp16_tflops >= gpu.bf16_tflops
    assert gpu.supports_bf16 == (name != "v100-32g")
    # a node's own links are at least as fast as the network between nodes
    assert gpu.inter_node_bandwidth_bytes_per_s <= gpu.intra_node_bandwidth_bytes_per_s
    assert gpu.host_mem_bytes_per_node >= gpu.gpus_per_node * gpu.hbm_bytes
    if name == "cpu":
        assert gpu.cuda_context_bytes == 0 and gpu.comm_buffer_bytes == 0
    else:
        assert gpu.cuda_context_bytes > 0 and gpu.comm_buffer_bytes > 0
        assert gpu.hbm_bandwidth_bytes_per_s > 1e11


def test_peak_flops_picks_precision():
    v100 = load_gpu("v100-32g")
    assert v100.peak_flops("bf16") == 0
    assert v100.peak_flops("fp16") == pytest.approx(125e12)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ProfileError) as err:
        load_model("internlm2-2b")
    assert "internlm2-20b" in str(err.value)
    assert "internlm2-2b" in str(err.value)


def test_unknown_gpu_suggests_close_names():
    with pytest.raises(ProfileError) as err:
        load_gpu("a100-80")
    assert "a100-80g" in str(err.value)


@pytest.mark.parametrize("spec,target", [("7b", 7e9), ("20b", 20e9), ("7.5b", 7.5e9), ("500m", 0.5e9)])
def test_bare_size_gives_generic_model(spec, target):
    model = resolve_model(spec)
    assert model.generic
    assert model.family == "generic"
    assert abs(model.num_params() - target) / target < 0.10, model.num_params()
    assert model.num_attention_heads % model.num_kv_heads == 0


def test_resolve_model_accepts_profile_names_and_paths():
    assert resolve_model("llama2-7b") == load_model("llama2-7b")
    from_file = resolve_model(str(DATA / "llama" / "config.json"))
    assert from_file.num_params() == load_model("llama2-7b").num_params()


def _architecture(model: ModelProfile) -> dict:
    return model.model_dump(exclude={"name", "source", "family"})


def test_hf_llama_config_matches_profile():
    model = model_from_hf_config(DATA / "llama" / "config.json")
    assert model.family == "llama" and not model.generic
    assert _architecture(model) == _architecture(load_model("llama2-7b"))


def test_hf_qwen2_config_defaults_to_qkv_bias_and_reads_tied_embeddings():
    model = model_from_hf_config(DATA / "qwen2" / "config.json")
    assert model.family == "qwen2"
    assert model.attention_bias and model.tie_word_embeddings
    assert _architecture(model) == _architecture(load_model("qwen2.5-0.5b"))


def test_hf_config_folder_is_accepted():
    by_folder = model_from_hf_config(DATA / "qwen2")
    by_file = model_from_hf_config(DATA / "qwen2" / "config.json")
    assert by_folder == by_file
    assert by_folder.name == "qwen2"


@pytest.mark.parametrize(
    "folder, named",
    [("mixtral", "num_local_experts"), ("missing_hidden", "hidden_size"), ("unsupported", "gpt_neox")],
    ids=["moe-refused", "missing-key", "unsupported-model-type"],
)
def test_hf_config_error_names_file_and_key(folder, named):
    path = DATA / folder / "config.json"
    with pytest.raises(ProfileError) as err:
        model_from_hf_config(path)
    msg = str(err.value)
    assert str(path) in msg and named in msg
    if folder == "mixtral":
        assert "\n" not in msg


def test_hf_config_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ProfileError, match="no such config.json"):
        model_from_hf_config(tmp_path)
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        model_from_hf_config(bad)


def test_hf_config_with_head_dim_and_gqa(tmp_path):
    cfg = json.loads((DATA / "llama" / "config.json").read_text())
    cfg.update(num_key_value_heads=8, head_dim=128, num_attention_heads=32)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = model_from_hf_config(tmp_path)
    assert model.num_kv_heads == 8 and model.head_size == 128
    gqa_saving = 2 * model.hidden_size * (32 - 8) * 128 * model.num_layers
    assert load_model("llama2-7b").num_params() - model.num_params() == gqa_saving
