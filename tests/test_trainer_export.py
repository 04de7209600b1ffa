"""The export streams safetensors shards: several shards and transformers' index for a small
shard limit, loadable by AutoModelForCausalLM.from_pretrained with the engine's weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from _launch import REPO, tiny_plan_dict
from conftest import free_port as _free_port

#: the tiny plan's tensors (hidden 64, 2 layers, GQA 4/2 heads of 16, ffn 128, vocab 512) in fp32:
#: embedding 512 x 64 x 4 = 131,072 bytes; q/o 16,384, k/v 8,192, each MLP matrix 32,768, norms 256
SHARD_LIMIT = 40_000

SCRIPT = r"""
import json, os, sys
from pathlib import Path
import torch, deepspeed
from ltune.planner.schema import Plan
from ltune.job.ds_config import build_ds_config
from ltune.trainer.engine import init_distributed, initialize
from ltune.trainer.export import export_hf_model
from ltune.trainer.model import build_model
from transformers import AutoModelForCausalLM

init_distributed()
args = json.loads(sys.argv[1])
out = {}
for case, plan_dict in args["plans"].items():
    plan = Plan.model_validate(plan_dict)
    ds_config = build_ds_config(plan)
    engine = initialize(plan, ds_config, build_model(plan, ds_config), total_steps=4)
    run_dir = Path(args["root"]) / case
    folder = export_hf_model(engine, plan, run_dir, max_shard_bytes=args["limit"])
    engine_weights = {}
    for name, param in engine.module.lm.named_parameters(remove_duplicate=False):
        with deepspeed.zero.GatheredParameters([param]):
            engine_weights[name] = param.detach().clone()
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    state = loaded.state_dict()
    out[case] = {
        "files": sorted(os.listdir(folder)),
        "sizes": {f: os.path.getsize(folder / f) for f in os.listdir(folder) if f.endswith(".safetensors")},
        "index": json.loads((folder / "model.safetensors.index.json").read_text()),
        "differ": [n for n, w in engine_weights.items() if not torch.equal(state[n], w)],
        "names": sorted(engine_weights) == sorted(state),
        "tied": loaded.lm_head.weight is loaded.model.embed_tokens.weight,
        "partitioned": all(hasattr(p, "ds_id") for p in engine.module.parameters()),
    }
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    plans = {}
    for tie in (False, True):
        plan = tiny_plan_dict(layout={"num_gpus": 1, "zero_stage": 3})
        plan["model"]["architecture"]["tie_word_embeddings"] = tie
        plans["tied" if tie else "untied"] = plan
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    args = {"plans": plans, "root": str(root), "limit": SHARD_LIMIT}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(args)], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, **env}, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])


def test_export_writes_shards_and_index_that_transformers_loads(exported):
    """Untied, 40,000-byte shards, tensors in module order: the embedding alone (131,072),
    each layer's q+k+v (32,768) | o (16,384) | gate (32,768) | up | down + 2 norms (33,280), the
    final norm (256) joining the last of them, then the head alone: 1 + 2 x 5 + 1 = 12 shards."""
    r = exported["untied"]
    shards = [f for f in r["files"] if f.endswith(".safetensors")]
    assert len(shards) == 12 and shards[0] == "model-00001-of-00012.safetensors"
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= set(r["files"])
    index = r["index"]
    assert set(index["weight_map"].values()) == set(shards)
    assert index["weight_map"]["model.embed_tokens.weight"] == "model-00001-of-00012.safetensors"
    assert index["weight_map"]["lm_head.weight"] == "model-00012-of-00012.safetensors"
    # 2 x 131,072 + 2 x (32,768 + 16,384 + 3 x 32,768 + 2 x 256) + 256 = 558,336 fp32 bytes
    assert index["metadata"]["total_size"] == 558_336
    assert index["weight_map"]["model.norm.weight"] == "model-00011-of-00012.safetensors"
    # each file: an 8-byte size, a JSON header, its tensors' bytes
    assert sum(r["sizes"].values()) > 558_336 + 12 * 8
    assert r["partitioned"] and r["names"] and r["differ"] == []


def test_tied_export_omits_the_head_and_loads_tied(exported):
    r = exported["tied"]
    index = r["index"]
    assert "lm_head.weight" not in index["weight_map"]
    assert index["metadata"]["total_size"] == 558_336 - 131_072
    assert r["tied"] and r["names"] and r["differ"] == []
