"""Model and GPU profiles: one JSON file each, looked up by name.

`--model` takes a profile name, a path to a Hugging Face config.json (or a folder
holding one), or a bare size such as `20b`; `--gpu` takes a GPU profile name.
"""

from __future__ import annotations

import difflib
import json
import re
from functools import lru_cache
from pathlib import Path

from pydantic import ValidationError

from ..datafiles import load_json
from .schema import GB, GIB, MOE_FAMILIES, GpuProfile, ModelProfile

__all__ = [
    "GB",
    "GIB",
    "GpuProfile",
    "ModelProfile",
    "ProfileError",
    "detect_gpu",
    "gpu_names",
    "gpu_profile_for",
    "load_gpu_option",
    "hf_cache_snapshot",
    "load_gpu",
    "load_model",
    "model_from_hf_config",
    "model_names",
    "resolve_model",
]

_HERE = Path(__file__).parent
_MODELS = _HERE / "models"
_GPUS = _HERE / "gpus"


class ProfileError(ValueError):
    """A bad model or GPU name, or an unreadable config.json (a user mistake, exit 2)."""


def _names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.json"))


def model_names() -> list[str]:
    return _names(_MODELS)


def gpu_names() -> list[str]:
    return _names(_GPUS)


def _did_you_mean(kind: str, name: str, choices: list[str]) -> ProfileError:
    close = difflib.get_close_matches(name.lower(), choices, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(choices)}"
    return ProfileError(f"unknown {kind} '{name}'{hint}")


def _load_json(path: Path) -> dict:
    data = load_json(path, ProfileError)
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


@lru_cache(maxsize=None)
def load_model(name: str) -> ModelProfile:
    """A model profile by its name (`internlm2-20b`)."""
    key = name.lower()
    if key not in model_names():
        raise _did_you_mean("model", name, model_names())
    return ModelProfile(**_load_json(_MODELS / f"{key}.json"))


@lru_cache(maxsize=None)
def load_gpu(name: str) -> GpuProfile:
    """A GPU profile by its name (`a100-80g`)."""
    key = name.lower()
    if key not in gpu_names():
        raise _did_you_mean("GPU", name, gpu_names())
    return GpuProfile(**_load_json(_GPUS / f"{key}.json"))


# ---------------------------------------------------------------- --gpu auto

#: nvidia-smi's name of a GPU -> its profile, most specific pattern first (lower case; a
#: minimum memory in MiB where the name alone does not say, as "NVIDIA A100-PCIE" does not)
GPU_NAME_PATTERNS = (
    (r"h100.*(pcie|pci-e)", 0, "h100-pcie"),
    (r"h100", 0, "h100-80g"),
    (r"h200", 0, "h200"),
    (r"h800", 0, "h800"),
    (r"\bh20\b", 0, "h20"),
    (r"b200", 0, "b200"),
    (r"a100.*80\s*g", 0, "a100-80g"),
    (r"a100.*40\s*g", 0, "a100-40g"),
    (r"a100", 60_000, "a100-80g"),
    (r"a100", 0, "a100-40g"),
    (r"a800", 0, "a800-80g"),
    (r"\ba10\b", 0, "a10"),
    (r"l40s", 0, "l40s"),
    (r"\bl20\b", 0, "l20"),
    (r"\b3090\b", 0, "rtx3090"),
    (r"\b4090\b", 0, "rtx4090"),
    (r"v100.*32\s*g", 0, "v100-32g"),
    (r"v100", 30_000, "v100-32g"),
)
_SMI_QUERY = ("nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits")


def gpu_profile_for(device_name: str, memory_mib: float = 0) -> str | None:
    """The profile of a GPU nvidia-smi names (`NVIDIA H100 80GB HBM3` -> h100-80g): the first
    of GPU_NAME_PATTERNS that matches; None when none does."""
    name = device_name.strip().lower()
    for pattern, min_mib, profile in GPU_NAME_PATTERNS:
        if re.search(pattern, name) and memory_mib >= min_mib:
            return profile
    return None


def detect_gpu() -> str:
    """`--gpu auto`: the profile of this machine's GPU, from nvidia-smi; a one-line
    ProfileError when nvidia-smi is absent or fails, or the GPU has no profile."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        raise ProfileError("--gpu auto: nvidia-smi not found on PATH; give a profile name (ltune gpus)")
    try:
        out = subprocess.run(_SMI_QUERY, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        raise ProfileError(f"--gpu auto: nvidia-smi failed ({e}); give a profile name (ltune gpus)") from None
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode or not lines:
        why = (out.stderr.strip().splitlines() or [f"exit {out.returncode}, no GPU listed"])[0]
        raise ProfileError(f"--gpu auto: nvidia-smi: {why[:120]}; give a profile name (ltune gpus)")
    found = set()
    for line in lines:
        name, _, memory = line.rpartition(",") if "," in line else (line, "", "")
        try:
            mib = float(memory.strip().split()[0]) if memory.strip() else 0.0
        except ValueError:
            mib = 0.0
        profile = gpu_profile_for(name, mib)
        if profile is None:
            raise ProfileError(f"--gpu auto: no profile for {name.strip()[:80]!r}; give the closest profile name "
                               "(ltune gpus)")
        found.add(profile)
    if len(found) > 1:
        raise ProfileError(f"--gpu auto: this machine has several GPU kinds ({', '.join(sorted(found))}); give one")
    return found.pop()


def load_gpu_option(name: str) -> GpuProfile:
    """`--gpu`: a profile name in any case, or `auto` (detect_gpu)."""
    return load_gpu(detect_gpu() if name.strip().lower() == "auto" else name.strip())


# ---------------------------------------------------------------- Hugging Face config.json

#: config.json model_type -> ModelProfile.family ("gemma3" reads its nested text_config)
_SUPPORTED_TYPES = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "internlm2": "internlm2", "qwen3": "qwen3",
    "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3", "phi3": "phi3",
    "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe",
    "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3",
}
#: keys naming routed experts; refused outside the mixture-of-experts types ltune reads
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
#: keys of multi-head latent attention (DeepSeek-V2/V3 MLA), modelled for the deepseek families only
_MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim")
_DEEPSEEK = ("deepseek_v2", "deepseek_v3")
#: transformers' defaults where a deepseek config.json leaves a key out (DeepseekV2Config, DeepseekV3Config)
_DEEPSEEK_DEFAULTS = {
    "deepseek_v2": {"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
                    "v_head_dim": 128, "first_k_dense_replace": 0, "routed_scaling_factor": 1.0,
                    "norm_topk_prob": False, "topk_method": "greedy", "scoring_func": "softmax"},
    "deepseek_v3": {"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
                    "v_head_dim": 128, "first_k_dense_replace": 3, "routed_scaling_factor": 2.5,
                    "norm_topk_prob": True, "topk_method": "noaux_tc", "scoring_func": "sigmoid"},
}
#: deepseek's topk_method values transformers builds (modeling_deepseek_v2.py DeepseekV2TopkRouter;
#: DeepseekV3TopkRouter always routes as noaux_tc)
_DEEPSEEK_TOPK = {"deepseek_v2": ("greedy", "group_limited_greedy"), "deepseek_v3": ("noaux_tc",)}
_GEMMA = ("gemma2", "gemma3")
#: transformers' defaults where a gemma config.json leaves a key out (Gemma2Config, Gemma3TextConfig)
_GEMMA_DEFAULTS = {
    "gemma2": {"sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
               "query_pre_attn_scalar": 256, "head_dim": 256},
    "gemma3": {"sliding_window": 4096, "final_logit_softcapping": None, "attn_logit_softcapping": None,
               "query_pre_attn_scalar": 256, "head_dim": 256},
}


def _unmodelled(cfg: dict, family: str) -> str | None:
    """The feature of this config.json that ltune does not model, named, or None."""
    for key in _MLA_KEYS if family not in _DEEPSEEK else ():
        if cfg.get(key):
            return f"multi-head latent attention ('{key}' {cfg[key]!r:.40})"
    if family in ("mixtral", "qwen3_moe", *_DEEPSEEK) and cfg.get("attention_bias"):
        return f"attention biases ('attention_bias' {cfg['attention_bias']!r:.20})"
    factor = cfg.get("partial_rotary_factor")
    if factor is not None and factor != 1:
        return f"partial rotary embedding ('partial_rotary_factor' {factor!r:.40})"
    if cfg.get("mlp_bias"):
        return f"biases on the MLP projections ('mlp_bias' {cfg['mlp_bias']!r:.40})"
    act_key = "hidden_activation" if family in _GEMMA and cfg.get("hidden_activation") else "hidden_act"
    act = cfg.get(act_key)
    wanted = ("gelu_pytorch_tanh",) if family in _GEMMA else ("silu",)
    if act is not None and act not in wanted:
        return f"activation '{act_key}' {act!r:.40} (ltune models {wanted[0]} for {family})"
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        if cfg.get("use_sliding_window"):
            return f"sliding-window attention ('use_sliding_window' {cfg['use_sliding_window']!r:.20}, 'sliding_window' {cfg.get('sliding_window')!r:.20})"
    elif family not in _GEMMA:
        window, longest = cfg.get("sliding_window"), cfg.get("max_position_embeddings") or 0
        if _is_whole(window) and window < longest:
            return (f"sliding-window attention on every layer ('sliding_window' {window} < "
                    f"'max_position_embeddings' {longest}; set it to null in a copy to plan full attention)")
    return None


def _window_pattern(cfg: dict, family: str, layers) -> int | None:
    """Every how-manieth layer is global: gemma2 alternates (transformers: even layers
    slide); gemma3 reads sliding_window_pattern; `layer_types`, where given, must agree."""
    if family == "gemma2":
        pattern = 2
    else:
        pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
    types = cfg.get("layer_types")
    if types is not None and isinstance(layers, int) and isinstance(pattern, int) and pattern > 0:
        expected = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
        if types != expected:
            # a regular pattern other than the default: find it, else refuse
            full = [i for i, t in enumerate(types) if t == "full_attention"] if isinstance(types, list) else []
            step = full[0] + 1 if full else None
            regular = step and types == ["full_attention" if (i + 1) % step == 0 else "sliding_attention"
                                         for i in range(layers)]
            if not regular:
                raise ValueError(f"an irregular 'layer_types' pattern ({str(types)[:60]}...)")
            pattern = step
    return pattern


def model_from_hf_config(path: str | Path, name: str | None = None) -> ModelProfile:
    """Read a Hugging Face config.json (or a folder holding one) without transformers."""
    path = Path(path)
    try:
        if path.is_dir():
            path = path / "config.json"
        found = path.is_file()
    except OSError as e:  # a name the file system refuses (too long)
        raise ProfileError(f"{str(path)[:80]}: cannot read ({e.strerror})") from None
    if not found:
        raise ProfileError(f"{path}: no such config.json")
    cfg = _load_json(path)
    model_type = cfg.get("model_type")
    if model_type is None:
        raise ProfileError(f"{path}: missing key 'model_type'")
    if not isinstance(model_type, str):
        raise ProfileError(f"{path}: 'model_type' must be a string (got {model_type!r:.80})")
    note = ""
    if model_type == "gemma3":  # Gemma3ForConditionalGeneration: the language model is text_config
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise ProfileError(f"{path}: 'gemma3' config has no 'text_config' object")
        cfg = text
        note = "; text_config only (the vision tower is not counted)"
    for key in _MOE_KEYS if _SUPPORTED_TYPES.get(model_type) not in MOE_FAMILIES else ():
        if cfg.get(key):
            raise ProfileError(
                f"{path}: '{model_type}' is a mixture-of-experts model ({key}={cfg[key]!r:.80}); "
                f"ltune models dense decoders and the mixture-of-experts types {', '.join(MOE_FAMILIES)} only"
            )
    if model_type not in _SUPPORTED_TYPES:
        raise ProfileError(
            f"{path}: unsupported 'model_type' {model_type!r:.80} (supported: {', '.join(sorted(_SUPPORTED_TYPES))})"
        )
    family = _SUPPORTED_TYPES[model_type]
    feature = _unmodelled(cfg, family)
    if feature:
        raise ProfileError(f"{path}: '{model_type}' with {feature} is not modelled by ltune")

    def need(key: str):
        if cfg.get(key) is None:
            raise ProfileError(f"{path}: missing key '{key}'")
        return cfg[key]

    def optional(key: str, default):
        """The value when present (validated below with the rest), else the default."""
        value = cfg.get(key)
        return default if value is None else value

    rope = cfg.get("rope_parameters")
    rope_scaling = cfg.get("rope_scaling")
    if rope_scaling is None and isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    heads = need("num_attention_heads")
    gemma = family in _GEMMA
    fields = dict(
        name=name or path.resolve().parent.name or path.stem,
        source=f"{path}{note}",
        family=family,
        hidden_size=need("hidden_size"),
        num_layers=need("num_hidden_layers"),
        num_attention_heads=heads,
        num_kv_heads=optional("num_key_value_heads", heads),
        intermediate_size=need("intermediate_size"),
        vocab_size=need("vocab_size"),
        # MLA heads: _moe_fields (transformers 5 writes head_dim = the rotary part only)
        head_dim=None if family in _DEEPSEEK else cfg.get("head_dim", _GEMMA_DEFAULTS[family]["head_dim"] if gemma else None),
        tie_word_embeddings=optional("tie_word_embeddings", gemma),
        attention_bias=(optional("qkv_bias", True) if family == "qwen2_moe"  # Qwen2MoeConfig.qkv_bias
                        else optional("attention_bias", model_type == "qwen2") or optional("bias", False)),
        max_position_embeddings=optional("max_position_embeddings", 4096),
        rope_theta=optional("rope_theta", rope.get("rope_theta", 10000.0) if isinstance(rope, dict) else 10000.0),
        rms_norm_eps=optional("rms_norm_eps", 1e-6 if gemma else 1e-5),
        rope_scaling=rope_scaling,
        qk_norm=family in ("qwen3", "gemma3", "qwen3_moe"),
        fused_qkv=family == "phi3",
        fused_gate_up=family == "phi3",
    )
    if gemma:
        defaults = _GEMMA_DEFAULTS[family]
        hidden = fields["hidden_size"]
        try:
            pattern = _window_pattern(cfg, family, fields["num_layers"])
        except ValueError as e:
            raise ProfileError(f"{path}: '{model_type}' with {e} is not modelled by ltune") from None
        fields.update(
            mlp_activation="gelu_tanh",
            norms_per_layer=4,
            embedding_multiplier=hidden ** 0.5 if isinstance(hidden, int) and hidden > 0 else 1.0,
            final_logit_softcapping=cfg.get("final_logit_softcapping", defaults["final_logit_softcapping"]),
            attn_logit_softcapping=cfg.get("attn_logit_softcapping", defaults["attn_logit_softcapping"]),
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", defaults["query_pre_attn_scalar"]),
            sliding_window=cfg.get("sliding_window", defaults["sliding_window"]),
            sliding_window_pattern=pattern,
        )
    keys = _HF_KEYS
    if family in MOE_FAMILIES:
        try:
            fields.update(_moe_fields(cfg, family, fields["num_layers"], need))
        except ValueError as e:
            raise ProfileError(f"{path}: '{model_type}' with {e} is not modelled by ltune") from None
        keys = {**_HF_KEYS, **_MOE_HF_KEYS[family]}
    try:
        return ModelProfile(**fields)
    except ValidationError as e:
        raise ProfileError(f"{path}: {_describe(e.errors()[0], fields, keys)}") from None


def _is_whole(value) -> bool:
    """A JSON whole number (an int that is not a bool, which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _moe_fields(cfg: dict, family: str, layers, need) -> dict:
    """A mixture-of-experts config.json's expert, router and latent-attention keys as ModelProfile fields.

    mixtral (configuration_mixtral.py): every layer sparse, intermediate_size is an expert's width.
    qwen2_moe / qwen3_moe (modeling_qwen2_moe.py `Qwen2MoeDecoderLayer`): layer i is sparse when i is
    not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0. deepseek_v2 / v3
    (modeling_deepseek_v3.py `DeepseekV3DecoderLayer`): the first first_k_dense_replace layers are dense.
    A ValueError names what transformers would not build as the config says.
    """
    def get(key: str, default):
        value = cfg.get(key)
        return default if value is None else value

    indices = range(layers) if _is_whole(layers) and layers > 0 else range(0)
    if family == "mixtral":
        return dict(num_experts=need("num_local_experts"), num_experts_per_tok=need("num_experts_per_tok"),
                    moe_intermediate_size=need("intermediate_size"), norm_topk_prob=True,
                    router_aux_loss_coef=get("router_aux_loss_coef", 0.001))
    if family in ("qwen2_moe", "qwen3_moe"):
        step, only = get("decoder_sparse_step", 1), get("mlp_only_layers", [])
        if not _is_whole(step) or step < 1:
            raise ValueError(f"'decoder_sparse_step' {step!r:.40} (a positive whole number)")
        if not isinstance(only, list) or not all(_is_whole(i) for i in only):
            raise ValueError(f"'mlp_only_layers' {only!r:.60} (a list of layer indices)")
        fields = dict(num_experts=need("num_experts"), num_experts_per_tok=need("num_experts_per_tok"),
                      moe_intermediate_size=need("moe_intermediate_size"),
                      dense_layers=tuple(sorted(set(only) | {i for i in indices if (i + 1) % step})),
                      norm_topk_prob=get("norm_topk_prob", False),
                      router_aux_loss_coef=get("router_aux_loss_coef", 0.001))
        if family == "qwen2_moe":  # one shared expert behind a sigmoid gate (0: none)
            shared = need("shared_expert_intermediate_size")
            fields.update(num_shared_experts=1 if shared else 0, shared_expert_intermediate_size=shared or None)
        return fields
    defaults = _DEEPSEEK_DEFAULTS[family]
    if get("moe_layer_freq", 1) != 1:
        raise ValueError(f"'moe_layer_freq' {cfg['moe_layer_freq']!r:.40} (transformers builds every layer "
                         "after first_k_dense_replace sparse: 1)")
    method = get("topk_method", defaults["topk_method"])
    if method not in _DEEPSEEK_TOPK[family]:
        raise ValueError(f"'topk_method' {method!r:.40} (transformers builds {', '.join(_DEEPSEEK_TOPK[family])})")
    scoring = get("scoring_func", defaults["scoring_func"])
    if scoring != defaults["scoring_func"]:
        raise ValueError(f"'scoring_func' {scoring!r:.40} (transformers' {family} scores by "
                         f"{defaults['scoring_func']})")
    first_dense = get("first_k_dense_replace", defaults["first_k_dense_replace"])
    if not _is_whole(first_dense) or first_dense < 0:
        raise ValueError(f"'first_k_dense_replace' {first_dense!r:.40} (a whole number)")
    greedy = method == "greedy"  # greedy top-k ignores the expert groups
    # q_lora_rank null (DeepSeek-V2-Lite): a plain q_proj; absent: transformers' default
    q_lora = cfg["q_lora_rank"] if "q_lora_rank" in cfg else defaults["q_lora_rank"]
    mla = {key: get(key, defaults[key]) for key in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")}
    rope, nope = mla["qk_rope_head_dim"], mla["qk_nope_head_dim"]
    both_ints = _is_whole(rope) and _is_whole(nope)
    return dict(num_experts=need("n_routed_experts"), num_experts_per_tok=need("num_experts_per_tok"),
                head_dim=rope + nope if both_ints else None,  # an MLA query/key head: non-rotary + rotary parts
                moe_intermediate_size=need("moe_intermediate_size"), num_shared_experts=get("n_shared_experts", 0),
                dense_layers=tuple(i for i in indices if i < first_dense), router_scoring=scoring,
                norm_topk_prob=get("norm_topk_prob", defaults["norm_topk_prob"]),
                router_groups=1 if greedy else get("n_group", 1), router_topk_groups=1 if greedy else get("topk_group", 1),
                routed_scaling_factor=get("routed_scaling_factor", defaults["routed_scaling_factor"]),
                router_aux_loss_coef=get("aux_loss_alpha", 0.0), q_lora_rank=q_lora, **mla)


#: ModelProfile's field names as config.json spells them
_HF_KEYS = {"num_layers": "num_hidden_layers", "num_kv_heads": "num_key_value_heads"}
_QWEN_MOE_KEYS = {"num_experts_per_tok": "num_experts_per_tok", "dense_layers": "mlp_only_layers"}
_DEEPSEEK_KEYS = {"num_experts_per_tok": "num_experts_per_tok", "num_experts": "n_routed_experts",
                  "num_shared_experts": "n_shared_experts", "dense_layers": "first_k_dense_replace",
                  "router_topk_groups": "topk_group", "router_groups": "n_group",
                  "router_aux_loss_coef": "aux_loss_alpha"}
_MOE_HF_KEYS = {
    "mixtral": {"num_experts_per_tok": "num_experts_per_tok", "num_experts": "num_local_experts",
                "moe_intermediate_size": "intermediate_size"},
    "qwen2_moe": _QWEN_MOE_KEYS, "qwen3_moe": _QWEN_MOE_KEYS, "deepseek_v2": _DEEPSEEK_KEYS,
    "deepseek_v3": _DEEPSEEK_KEYS,
}


def _describe(err: dict, fields: dict, keys: dict = _HF_KEYS) -> str:
    """One pydantic error in config.json's own key names, with the value."""
    if not err["loc"]:  # a rule across fields (heads and sizes)
        msg = err["msg"].removeprefix("Value error, ")
        for ours, theirs in sorted(keys.items(), key=lambda kv: -len(kv[0])):
            msg = re.sub(rf"\b{ours}\b", theirs, msg)
        return msg
    key = str(err["loc"][0])
    return f"bad value for '{keys.get(key, key)}': {err['msg']} (got {fields.get(key)!r:.80})"


# ---------------------------------------------------------------- bare sizes ("20b")

#: a bound on bare sizes before any arithmetic (the shapes searched end near 0.5T parameters)
MAX_GENERIC_PARAMS = 10**15
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([bm])$", re.IGNORECASE)


#: published shapes the generic sizes copy (config.json values; Llama 3 vocabulary 128,256 for
#: all): name, hidden, layers, heads, kv heads, head_dim, ffn, tied embeddings
_GENERIC_SHAPES = (
    ("Llama-3.2-1B", 2048, 16, 32, 8, 64, 8192, True),
    ("Llama-3.2-3B", 3072, 28, 24, 8, 128, 8192, True),
    ("Llama-3.1-8B", 4096, 32, 32, 8, 128, 14336, False),
    ("Qwen2.5-14B", 5120, 48, 40, 8, 128, 13824, False),
    ("Qwen2.5-32B", 5120, 64, 40, 8, 128, 27648, False),
    ("Yi-34B", 7168, 60, 56, 8, 128, 20480, False),
    ("Llama-3.1-70B", 8192, 80, 64, 8, 128, 28672, False),
    ("Llama-3.1-405B", 16384, 126, 128, 8, 128, 53248, False),
)
GENERIC_VOCAB = 128256
#: a size within this fraction of a published shape's count keeps that shape's layer count
_SAME_SIZE = 0.10


def _shape(label: str, h: int, layers: int, heads: int, kv: int, hd: int, ffn: int, tied: bool) -> ModelProfile:
    return ModelProfile(
        name=label, source="", family="generic", hidden_size=h, num_layers=layers, num_attention_heads=heads,
        num_kv_heads=kv, head_dim=hd, intermediate_size=ffn, vocab_size=GENERIC_VOCAB, tie_word_embeddings=tied,
        max_position_embeddings=131072, rope_theta=500000.0, generic=True,
    )


def generic_model(target_params: int) -> ModelProfile:
    """A stand-in with about `target_params` parameters, shaped like a published model.

    The published shape nearest in log size (Llama 3.2/3.1, Qwen2.5, Yi; 8 grouped-query kv heads,
    heads a multiple of 8 from 8B up, vocabulary 128,256) is kept whole when the size is within
    10% of it, else its width is kept and the layer count set to reach the size. Past
    Llama-3.1-405B the width grows as the cube root of the size ratio (head_dim 128, heads a
    multiple of 8, ffn 3.25 x hidden as in 405B) and layers fill the rest; below Llama-3.2-1B the
    width shrinks the same way (head_dim 64), at least 2 layers.
    """
    import math

    shapes = [(_shape(*row), row) for row in _GENERIC_SHAPES]
    model, row = min(shapes, key=lambda s: abs(math.log(s[0].num_params() / target_params)))
    name, h, layers, heads, kv, hd, ffn, tied = row
    biggest, smallest = shapes[-1][0], shapes[0][0]
    if abs(model.num_params() - target_params) <= _SAME_SIZE * target_params:
        how = f"{layers} layers as published"
    else:
        width = ""
        if target_params > biggest.num_params() or target_params < smallest.num_params():
            hd = 128 if target_params > biggest.num_params() else 64
            scale = (target_params / model.num_params()) ** (1 / 3)
            h = max(8 * hd, round(h * scale / (8 * hd)) * 8 * hd)  # heads a multiple of 8
            heads = h // hd
            ffn = -(-int(h * ffn / row[1]) // 256) * 256
            width = f"width scaled by the cube root of the size ratio, {heads} heads, "
        probe = _shape(name, h, 1, heads, kv, hd, ffn, tied)
        per_layer = probe.layer_params()
        layers = max(2, round((target_params - probe.num_params() + per_layer) / per_layer))
        how = f"{width}{layers} layers to reach the size"
        model = _shape(name, h, layers, heads, kv, hd, ffn, tied)
    size = f"{target_params / 1e9:g}B" if target_params >= 1e9 else f"{target_params / 1e6:g}M"
    return model.model_copy(update={
        "name": f"generic-{size.lower()}",
        "source": f"generic, shaped like {name} ({how}; vocabulary {GENERIC_VOCAB:,}); not a real model",
    })


# ---------------------------------------------------------------- the local Hugging Face cache

_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hf_cache_roots() -> list[Path]:
    """Where huggingface_hub keeps downloads: HF_HUB_CACHE, else HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub (huggingface_hub constants)."""
    import os

    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"]).expanduser()]
    if os.environ.get("HF_HOME"):
        return [Path(os.environ["HF_HOME"]).expanduser() / "hub"]
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return [base / "huggingface" / "hub"]


def hf_cache_snapshot(name: str) -> Path | None:
    """The cached snapshot folder of `org/name` holding a config.json: the revision refs/main
    names, else the newest snapshot; None when not cached. No network, no huggingface_hub."""
    if not _REPO_RE.match(name) or ".." in name:
        return None
    for root in hf_cache_roots():
        repo = root / ("models--" + name.replace("/", "--"))
        try:
            snapshots = repo / "snapshots"
            ref = repo / "refs" / "main"
            if ref.is_file():
                rev = ref.read_text(encoding="utf-8").strip()
                if re.fullmatch(r"[\w.-]+", rev) and (snapshots / rev / "config.json").is_file():
                    return snapshots / rev
            if snapshots.is_dir():
                found = [d for d in snapshots.iterdir() if (d / "config.json").is_file()]
                if found:
                    return max(found, key=lambda d: d.stat().st_mtime)
        except OSError:
            continue
    return None


def _is_dir(spec: str) -> bool:
    try:
        return Path(spec).is_dir()
    except OSError:  # too long for a path: not a folder
        return False


def _exists(spec: str) -> bool:
    try:
        return Path(spec).exists()
    except OSError:
        return False


def resolve_model(spec: str) -> ModelProfile:
    """`--model`: a profile name, a config.json path or folder, `org/name` from the local
    Hugging Face cache, or a bare size (`7.5b`)."""
    m = _SIZE_RE.match(spec.strip())
    if m:
        scale = 1e9 if m.group(2).lower() == "b" else 1e6
        target = int(float(m.group(1)) * scale) if len(m.group(1)) < 20 else 0
        if not 0 < target <= MAX_GENERIC_PARAMS:
            raise ProfileError(f"model size '{spec}' must be positive and below {MAX_GENERIC_PARAMS // 10**9}b")
        return generic_model(target)
    if spec.lower() in model_names():
        return load_model(spec)
    if _REPO_RE.match(spec) and not spec.endswith(".json") and not _exists(spec):
        snapshot = hf_cache_snapshot(spec)
        if snapshot is None:
            where = ", ".join(str(r / ("models--" + spec.replace("/", "--"))) for r in hf_cache_roots())
            raise ProfileError(
                f"'{spec}' is not in the local Hugging Face cache (looked in {where}); "
                "a local model folder or a config.json path also works"
            )
        return model_from_hf_config(snapshot, name=spec)
    if spec.endswith(".json") or "/" in spec or _is_dir(spec):
        return model_from_hf_config(spec)
    raise _did_you_mean("model", spec, model_names())
