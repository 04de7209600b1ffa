"""config.json files, mutated: a model profile or one ProfileError line, never a crash."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from _fuzz import BAD_BYTES, CASES, DEEP_DOCS, mutate_mapping, one_line
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ltune.profiles import ModelProfile, ProfileError, model_from_hf_config

DATA = Path(__file__).parent / "data"
VALID = json.loads((DATA / "qwen2" / "config.json").read_text())


def _judge(raw: bytes) -> ModelProfile | str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.json"
        path.write_bytes(raw)
        try:
            return model_from_hf_config(path)
        except ProfileError as e:
            assert one_line(str(e)) and str(path) in str(e), repr(str(e))
            return str(e)


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_mutated_config_json(data):
    CASES["config.json"] += 1
    cfg = mutate_mapping(VALID, data.draw)
    got = _judge(json.dumps(cfg).encode())
    if isinstance(got, ModelProfile):  # accepted: then its numbers make sense together
        assert got.num_attention_heads % got.num_kv_heads == 0
        assert got.head_size > 0 and got.num_params() > 0


#: the keys the importer reads; any other key is ignored
USED_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "vocab_size", "head_dim", "tie_word_embeddings", "attention_bias",
             "max_position_embeddings", "rope_theta", "rms_norm_eps",
             "hidden_act", "use_sliding_window", "rope_scaling")  # read to refuse activations and windows ltune does not model


@pytest.mark.parametrize("key", sorted(VALID) + ["head_dim", "attention_bias"])
@pytest.mark.parametrize("value", [[], {}, "12", -1, 0, 1.5, 2**80, True, "\n"])
def test_a_wrong_value_is_named_by_its_key(key, value):
    """Either the value is one that makes sense (accepted), or the error names the key."""
    CASES["config.json"] += 1
    got = _judge(json.dumps(VALID | {key: value}).encode())
    if key not in USED_KEYS:
        assert isinstance(got, ModelProfile), got
    elif isinstance(got, str):
        assert f"'{key}'" in got or f"{key} (" in got, got


@pytest.mark.parametrize("raw", [d.encode() for d in DEEP_DOCS] + list(BAD_BYTES) + [
    b"[1, 2]", b"\"llama\"", b"null", b"", b"{", b"{\"model_type\": [\"llama\"]}", b"{\"model_type\": \"llama\"}",
])
def test_broken_files(raw):
    CASES["config.json"] += 1
    assert isinstance(_judge(raw), str)


@pytest.mark.parametrize("change, message", [
    ({"model_type": ["llama"]}, "'model_type' must be a string"),
    ({"rms_norm_eps": None}, None),  # null means unset: the default applies
    ({"rms_norm_eps": -1}, "bad value for 'rms_norm_eps'"),
    ({"head_dim": -4096}, "bad value for 'head_dim'"),
    ({"head_dim": 0}, "bad value for 'head_dim'"),
    ({"num_key_value_heads": 3}, "num_key_value_heads (3) must divide num_attention_heads (14)"),
    ({"hidden_size": 900}, "hidden_size (900) must be divisible by num_attention_heads (14)"),
    ({"num_hidden_layers": 10**6}, "bad value for 'num_hidden_layers'"),
])
def test_reported_defects(change, message):
    """Each input the issue found crashing or accepted as nonsense."""
    got = _judge(json.dumps(VALID | change).encode())
    if message is None:
        assert isinstance(got, ModelProfile)
    else:
        assert isinstance(got, str) and message in got, got
