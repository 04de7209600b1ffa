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
from .schema import GB, GIB, GpuProfile, ModelProfile

__all__ = [
    "GB",
    "GIB",
    "GpuProfile",
    "ModelProfile",
    "ProfileError",
    "gpu_names",
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


# ---------------------------------------------------------------- Hugging Face config.json

_SUPPORTED_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "internlm2": "internlm2"}
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def model_from_hf_config(path: str | Path) -> ModelProfile:
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
    for key in _MOE_KEYS:
        if cfg.get(key):
            raise ProfileError(
                f"{path}: '{model_type}' is a mixture-of-experts model ({key}={cfg[key]!r:.80}); "
                "ltune models dense decoders only"
            )
    if model_type not in _SUPPORTED_TYPES:
        raise ProfileError(
            f"{path}: unsupported 'model_type' {model_type!r:.80} (supported: {', '.join(sorted(_SUPPORTED_TYPES))})"
        )

    def need(key: str):
        if cfg.get(key) is None:
            raise ProfileError(f"{path}: missing key '{key}'")
        return cfg[key]

    def optional(key: str, default):
        """The value when present (validated below with the rest), else the default."""
        value = cfg.get(key)
        return default if value is None else value

    rope = cfg.get("rope_parameters")
    heads = need("num_attention_heads")
    fields = dict(
        name=path.resolve().parent.name or path.stem,
        source=str(path),
        family=_SUPPORTED_TYPES[model_type],
        hidden_size=need("hidden_size"),
        num_layers=need("num_hidden_layers"),
        num_attention_heads=heads,
        num_kv_heads=optional("num_key_value_heads", heads),
        intermediate_size=need("intermediate_size"),
        vocab_size=need("vocab_size"),
        head_dim=cfg.get("head_dim"),
        tie_word_embeddings=optional("tie_word_embeddings", False),
        attention_bias=optional("attention_bias", model_type == "qwen2") or optional("bias", False),
        max_position_embeddings=optional("max_position_embeddings", 4096),
        rope_theta=optional("rope_theta", rope.get("rope_theta", 10000.0) if isinstance(rope, dict) else 10000.0),
        rms_norm_eps=optional("rms_norm_eps", 1e-5),
    )
    try:
        return ModelProfile(**fields)
    except ValidationError as e:
        raise ProfileError(f"{path}: {_describe(e.errors()[0], fields)}") from None


#: ModelProfile's field names as config.json spells them
_HF_KEYS = {"num_layers": "num_hidden_layers", "num_kv_heads": "num_key_value_heads"}


def _describe(err: dict, fields: dict) -> str:
    """One pydantic error in config.json's own key names, with the value."""
    if not err["loc"]:  # a rule across fields (heads and sizes)
        msg = err["msg"].removeprefix("Value error, ")
        for ours, theirs in _HF_KEYS.items():
            msg = msg.replace(ours, theirs)
        return msg
    key = str(err["loc"][0])
    return f"bad value for '{_HF_KEYS.get(key, key)}': {err['msg']} (got {fields.get(key)!r:.80})"


# ---------------------------------------------------------------- bare sizes ("20b")

#: a bound on bare sizes before any arithmetic (the shapes searched end near 0.5T parameters)
MAX_GENERIC_PARAMS = 10**15
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([bm])$", re.IGNORECASE)


def generic_model(target_params: int) -> ModelProfile:
    """A llama-shaped stand-in with about `target_params` parameters.

    Shape rules from the Llama 2 and 3 families (Touvron et al. 2023): head_dim 128,
    hidden width a multiple of 256, gated MLP of ~8/3 h rounded up to 256, 8 KV heads
    once there are 16 heads or more, vocabulary 32000, and about 100-160 hidden units per
    layer; among those shapes, the one closest to the size, then to 128 units per layer.
    """
    best: tuple[tuple[float, float], ModelProfile] | None = None
    for h in range(512, 16385, 256):
        heads = h // 128 if h % 128 == 0 else h // 64
        kv = 8 if heads >= 16 and heads % 8 == 0 else heads
        ffn = -(-int(8 * h / 3) // 256) * 256
        probe = ModelProfile(name="probe", source="", family="generic", hidden_size=h, num_layers=1,
                             num_attention_heads=heads, num_kv_heads=kv, intermediate_size=ffn, vocab_size=32000)
        per_layer = probe.layer_params()
        layers = max(2, round((target_params - probe.num_params() + per_layer) / per_layer))
        if not 100 <= h / layers <= 160:
            continue
        cand = probe.model_copy(update={"name": f"generic-{h}x{layers}", "num_layers": layers, "generic": True,
                                        "source": "generic llama-shaped estimate (no published config)"})
        key = (abs(cand.num_params() - target_params) / target_params, abs(h / layers - 128))
        if best is None or key < best[0]:
            best = (key, cand)
    if best is None:
        raise ProfileError(f"no llama-shaped model near {target_params / 1e9:g}B parameters")
    return best[1]


def _is_dir(spec: str) -> bool:
    try:
        return Path(spec).is_dir()
    except OSError:  # too long for a path: not a folder
        return False


def resolve_model(spec: str) -> ModelProfile:
    """`--model`: a profile name, a config.json path or folder, or a bare size (`7.5b`)."""
    m = _SIZE_RE.match(spec.strip())
    if m:
        scale = 1e9 if m.group(2).lower() == "b" else 1e6
        target = int(float(m.group(1)) * scale) if len(m.group(1)) < 20 else 0
        if not 0 < target <= MAX_GENERIC_PARAMS:
            raise ProfileError(f"model size '{spec}' must be positive and below {MAX_GENERIC_PARAMS // 10**9}b")
        return generic_model(target)
    if spec.lower() in model_names():
        return load_model(spec)
    if spec.endswith(".json") or "/" in spec or _is_dir(spec):
        return model_from_hf_config(spec)
    raise _did_you_mean("model", spec, model_names())
