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
    # the newer families (held to 0.5%): the model cards' "Number of Parameters" (Qwen3: 0.6B / 8.2B / 32.8B;
    # Gemma 2: 9.24B / 27.2B, the Hugging Face page's safetensors figure), keras-hub phi3_presets
    # (Phi-3-mini 3,821,079,552), Meta's Llama 3.2 model card table (1B: 1.23B, 3B: 3.21B), the
    # Hugging Face pages' safetensors figure for Llama 3.3 70B (70.6B) and Mistral-Nemo (12.2B). Gemma 3 publishes its count with the
    # vision tower (12B / 27B), so the text model is held to the Gemma 3 Technical Report's Table 1
    # below (non-embedding parameters), and its total here is embedding + that figure.
    "qwen3-0.6b": 0.6e9,
    "qwen3-8b": 8.2e9,
    "qwen3-32b": 32.8e9,
    "gemma-2-9b": 9.24e9,
    "gemma-2-27b": 27.2e9,
    "gemma-3-12b": 262208 * 3840 + 10_759e6,
    "gemma-3-27b": 262208 * 5376 + 25_600e6,
    "phi-3-mini": 3_821_079_552,
    "llama3.2-1b": 1.23e9,
    "llama3.2-3b": 3.21e9,
    "llama3.3-70b": 70.6e9,
    "mistral-nemo-12b": 12.2e9,
    # mixture-of-experts totals, every expert counted (sources and active counts: tests/test_moe_profiles.py)
    "mixtral-8x7b": 46.7e9,
    "qwen1.5-moe-a2.7b": 14.3e9,
    "qwen2-57b-a14b": 57.4e9,
    "qwen3-30b-a3b": 30.5e9,
    "qwen3-235b-a22b": 235e9,
    "deepseek-v2-lite": 15.7e9,
    "deepseek-v3": 671e9,
}
#: the newer families' profiles, whose count must match within 0.5%
NEW_FAMILY_PROFILES = {
    "qwen3-0.6b", "qwen3-8b", "qwen3-32b", "gemma-2-9b", "gemma-2-27b", "gemma-3-12b", "gemma-3-27b",
    "phi-3-mini", "llama3.2-1b", "llama3.2-3b", "llama3.3-70b", "mistral-nemo-12b",
    "mixtral-8x7b", "qwen1.5-moe-a2.7b", "qwen2-57b-a14b", "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v2-lite",
    "deepseek-v3",
}
#: published figures given to one digit (Qwen3-0.6B: "0.6B"), checked by rounding
ROUNDED_TO = {"qwen3-0.6b": 0.1e9}
#: published non-embedding counts: Qwen3 model cards (0.44B, 6.95B, 31.2B), Gemma 3 Technical
#: Report Table 1 (10,759M, 25,600M)
PUBLISHED_NON_EMBEDDING = {
    "qwen3-0.6b": 0.44e9, "qwen3-8b": 6.95e9, "qwen3-32b": 31.2e9, "gemma-3-12b": 10_759e6, "gemma-3-27b": 25_600e6,
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
    if model.head_dim is None:
        assert model.head_size * model.num_attention_heads == model.hidden_size
    published = PUBLISHED_PARAMS[name]
    tolerance = 0.005 if name in NEW_FAMILY_PROFILES else 0.03
    if name in ROUNDED_TO:  # a one-digit figure: the count must round to it (0.5% is held on the non-embedding one)
        tolerance = ROUNDED_TO[name] / 2 / published
    assert abs(model.num_params() - published) / published < tolerance, (model.num_params(), published)


@pytest.mark.parametrize("name", sorted(PUBLISHED_NON_EMBEDDING))
def test_non_embedding_count_matches_published(name):
    """Layers alone (q/k norms, four norms, head_dim independent of hidden) against the published figure."""
    model = load_model(name)
    non_embedding = model.num_params() - model.embedding_params() - model.lm_head_params()
    published = PUBLISHED_NON_EMBEDDING[name]
    assert abs(non_embedding - published) / published < 0.005, (non_embedding, published)


def test_family_tensors_counted_by_hand():
    """One layer of each new family, counted by hand from transformers' module shapes."""
    q3 = load_model("qwen3-0.6b")  # q 1024->2048, k/v 1024->1024, o 2048->1024, q/k norm 128, mlp 3x1024x3072
    assert q3.layer_params() == 1024 * 2048 + 2 * 1024 * 1024 + 2048 * 1024 + 2 * 128 + 3 * 1024 * 3072 + 2 * 1024
    g2 = load_model("gemma-2-9b")  # 16 heads x 256 = 4096 q width, 8 kv heads x 256, four norms
    assert g2.layer_params() == 3584 * 4096 + 2 * 3584 * 2048 + 4096 * 3584 + 3 * 3584 * 14336 + 4 * 3584
    phi = load_model("phi-3-mini")  # fused: qkv_proj 3072 -> 9216, gate_up_proj 3072 -> 16384
    assert sorted(phi.layer_tensors())[-2:] == [3 * 3072 * 3072, 2 * 8192 * 3072]
    assert phi.largest_tensor_params() == 32064 * 3072  # the embedding is bigger still
    unfused = phi.model_copy(update={"fused_qkv": False, "fused_gate_up": False})
    assert unfused.num_params() == phi.num_params() and max(unfused.layer_tensors()) == 8192 * 3072
    tiny_vocab = phi.model_copy(update={"vocab_size": 1000})
    assert tiny_vocab.largest_tensor_params() == 2 * 8192 * 3072
    # persistent (<= 1e5 elements): norms, q/k norm weights, final norm
    assert q3.persistent_params() == 28 * (2 * 1024 + 2 * 128) + 1024
    assert g2.persistent_params() == 42 * 4 * 3584 + 3584
    assert load_model("qwen2.5-0.5b").persistent_params() == 24 * (2 * 896 + 896 + 2 * 128) + 896


def test_local_layers_follow_transformers_pattern():
    """Gemma 2: even layers slide (`not bool(layer_idx % 2)`); Gemma 3: five local, then one global."""
    g2, g3 = load_model("gemma-2-9b"), load_model("gemma-3-27b")
    assert [g2.is_local_layer(i) for i in range(4)] == [True, False, True, False]
    assert [g3.is_local_layer(i) for i in range(12)] == [True] * 5 + [False] + [True] * 5 + [False]
    assert sum(not g3.is_local_layer(i) for i in range(g3.num_layers)) == 10  # 62 layers: 10 global
    assert not any(load_model("llama3.3-70b").is_local_layer(i) for i in range(80))


@pytest.mark.parametrize(
    "name, trained",
    [("llama3.2-1b", 131072), ("llama3.3-70b", 131072), ("gemma-3-12b", 131072), ("qwen3-8b", 40960),
     ("gemma-2-9b", 8192), ("mistral-nemo-12b", 1024000)],
)
def test_trained_context_from_published_lengths(name, trained):
    """The model cards' context lengths (Llama 3.2/3.3 128k, Gemma 3 128k, Qwen3 32k native + 40960
    configured, Gemma 2 8k)."""
    assert load_model(name).trained_context() == trained


def test_trained_context_with_qwen_yarn_block():
    """Qwen3's model card: add rope_scaling yarn factor 4 over 32768 tokens for 131,072."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert load_model("qwen3-8b").model_copy(update={"rope_scaling": yarn}).trained_context() == 131072


def test_context_warning_names_trained_length_and_remedies():
    from ltune.planner.warnings import context_warning

    model = load_model("qwen3-8b")
    assert context_warning(model, 40960) is None
    text = context_warning(model, 65536)
    assert "40,960" in text and "YaRN" in text and "rope" in text and "\n" not in text


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


GENERIC_SIZES = ["7b", "8b", "13b", "20b", "34b", "70b", "120b", "405b", "1000b"]


@pytest.mark.parametrize("spec", GENERIC_SIZES)
def test_generic_sizes_allow_sp_8_and_use_a_128k_vocab(spec):
    """Sequence parallelism of 8 splits heads and kv heads over 8 ranks (Ulysses)."""
    from ltune.planner.schema import check_sp_degree

    model = resolve_model(spec)
    assert model.num_kv_heads == 8 and model.num_attention_heads % 8 == 0
    assert model.vocab_size == 128256
    assert "generic, shaped like" in model.source
    check_sp_degree(8, model)  # raises when sp 8 is not possible


@pytest.mark.parametrize(
    "spec, like, layers, published",
    [("8b", "Llama-3.1-8B", 32, 8.03e9), ("70b", "Llama-3.1-70B", 80, 70.6e9), ("405b", "Llama-3.1-405B", 126, 405.9e9)],
)
def test_generic_size_at_a_published_model_is_that_model(spec, like, layers, published):
    """A size within 10% of a published shape keeps its layer count: the Hugging Face pages'
    safetensors counts (8.03B, 70.6B, 406B) come out."""
    model = resolve_model(spec)
    assert f"shaped like {like}" in model.source and model.num_layers == layers
    assert abs(model.num_params() - published) / published < 0.005


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
    [("missing_hidden", "hidden_size"), ("unsupported", "gpt_neox")],
    ids=["missing-key", "unsupported-model-type"],
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


# ---------------------------------------------------------------- config.json per family


@pytest.mark.parametrize(
    "folder, profile",
    [("qwen3", "qwen3-8b"), ("gemma2", "gemma-2-9b"), ("gemma3", "gemma-3-12b"), ("llama3.2", "llama3.2-3b"),
     ("mistral_nemo", "mistral-nemo-12b")],
)
def test_hf_config_of_each_family_matches_its_profile(folder, profile):
    """The published config.json reads to the shipped profile's architecture (all fields)."""
    model = model_from_hf_config(DATA / folder / "config.json")
    assert model.family == load_model(profile).family
    assert _architecture(model) == _architecture(load_model(profile))


def test_hf_gemma3_text_config_alone(tmp_path):
    """model_type gemma3_text (Gemma3ForCausalLM) reads like the nested text_config."""
    text = json.loads((DATA / "gemma3" / "config.json").read_text())["text_config"]
    (tmp_path / "config.json").write_text(json.dumps(text))
    assert _architecture(model_from_hf_config(tmp_path)) == _architecture(load_model("gemma-3-12b"))


def test_hf_phi3_every_layer_window_refused_and_full_attention_read(tmp_path):
    """Phi-3-mini-4k slides a 2047-token window over every layer: refused, named; null reads fused."""
    path = DATA / "phi3" / "config.json"
    with pytest.raises(ProfileError) as err:
        model_from_hf_config(path)
    assert "'sliding_window' 2047" in str(err.value) and "\n" not in str(err.value)
    cfg = json.loads(path.read_text())
    cfg["sliding_window"] = None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = model_from_hf_config(tmp_path)
    assert model.fused_qkv and model.fused_gate_up
    assert _architecture(model) == _architecture(load_model("phi-3-mini"))


@pytest.mark.parametrize(
    "folder, change, named",
    [
        ("qwen3", {"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
        ("llama3.2", {"q_lora_rank": 1536, "kv_lora_rank": 512}, "latent attention"),
        ("phi3", {"sliding_window": None, "partial_rotary_factor": 0.75}, "partial_rotary_factor"),
        ("llama3.2", {"mlp_bias": True}, "mlp_bias"),
        ("llama3.2", {"hidden_act": "gelu"}, "hidden_act"),
        ("mistral_nemo", {"sliding_window": 4096}, "'sliding_window' 4096"),
        ("gemma3", {"layer_types": ["sliding_attention", "full_attention", "full_attention"] + ["sliding_attention"] * 45},
         "layer_types"),
    ],
    ids=["qwen-sliding", "mla", "partial-rotary", "mlp-bias", "activation", "mistral-window", "irregular-layers"],
)
def test_hf_config_with_unmodelled_feature_is_refused_naming_it(tmp_path, folder, change, named):
    cfg = json.loads((DATA / folder / "config.json").read_text())
    (cfg["text_config"] if "text_config" in cfg else cfg).update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ProfileError) as err:
        model_from_hf_config(tmp_path)
    msg = str(err.value)
    assert named in msg and "not modelled" in msg and "\n" not in msg


def test_hf_gemma3_layer_types_with_the_default_pattern_read(tmp_path):
    cfg = json.loads((DATA / "gemma3" / "config.json").read_text())
    text = cfg["text_config"]
    del text["sliding_window_pattern"]
    text["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(48)]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert model_from_hf_config(tmp_path).sliding_window_pattern == 6


def test_unsupported_model_type_lists_new_families():
    with pytest.raises(ProfileError) as err:
        model_from_hf_config(DATA / "unsupported" / "config.json")
    msg = str(err.value)
    assert all(t in msg for t in ("qwen3", "gemma2", "gemma3_text", "phi3")) and "\n" not in msg
