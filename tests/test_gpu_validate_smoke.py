"""bench/gpu_validate.py's pure parts: the longest-context search, the planner's predicted
longest context, the prediction keys, the GPU profile match, the data generator.

The GPU run itself (and its CPU smoke mode, ~1-5 min here) is not run by the suite:
``bash bench/gpu_validate.sh --cpu-smoke``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from ltune.planner.memory import estimate_memory
from ltune.profiles import load_gpu

_PATH = Path(__file__).resolve().parent.parent / "bench" / "gpu_validate.py"
_spec = importlib.util.spec_from_file_location("gpu_validate", _PATH)
gv = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("gpu_validate", gv)  # dataclasses look their module up there
_spec.loader.exec_module(gv)


class FakeGpu:
    """A context trains iff it is at most ``limit``; records each process (batch) it is given."""

    def __init__(self, limit: int):
        self.limit = limit
        self.batches: list[list[int]] = []

    def run_batch(self, contexts):
        self.batches.append(list(contexts))
        out = []
        for n in contexts:
            out.append((n, "ok" if n <= self.limit else "oom"))
            if n > self.limit:
                break  # the process stops at its first failure
        return out


def _search(gpu, *, time_s=1e9, known_ok=0, bisections=2, est=lambda n: 1.0):
    return gv.search_longest(
        gpu.run_batch, start=8192, granularity=4096, bisections=bisections, known_ok=known_ok,
        upper=1 << 21, time_left=lambda: time_s, estimate_s=est, overhead_s=lambda: 10.0,
    )


@pytest.mark.parametrize("limit", [20_000, 40_000, 300_000])
def test_search_brackets_the_limit(limit):
    gpu = FakeGpu(limit)
    r = _search(gpu, bisections=6)
    assert r["longest_ok"] <= limit < r["first_oom"]
    assert r["first_oom"] - r["longest_ok"] <= 4096 or r["first_oom"] - r["longest_ok"] < 2 * 4096
    assert gpu.batches[0][:3] == [8192, 16384, 32768]  # doubling, in one process
    assert all(len(b) == 1 for b in gpu.batches[1:])  # each midpoint a process of its own
    assert r["stopped"] is None


def test_search_skips_known_contexts_and_respects_budget():
    gpu = FakeGpu(10**9)
    # known_ok 32k: doubling starts at 64k; the budget (100 s, 10 s overhead, est n/4096 s)
    # admits 64k (16 s) and 128k (32 s) but not 256k (64 s more)
    r = _search(gpu, time_s=100.0, known_ok=32768, est=lambda n: n / 4096)
    assert gpu.batches == [[65536, 131072]]
    assert r["longest_ok"] == 131072 and r["first_oom"] is None
    assert r["stopped"].startswith("budget")


def test_search_stops_at_an_error():
    def run_batch(contexts):
        return [(contexts[0], "error rc=1")]

    r = gv.search_longest(run_batch, start=8192, granularity=4096, bisections=2, upper=1 << 20,
                          time_left=lambda: 1e9, estimate_s=lambda n: 1.0, overhead_s=lambda: 1.0)
    assert r["longest_ok"] == 0 and r["first_oom"] is None and "error" in r["stopped"]


@pytest.mark.parametrize("kind", ["ltune", "hf"])
def test_predicted_longest_is_the_planner_boundary(kind):
    gpu = load_gpu("h100-80g")
    layout = gv.Config(gv.MODEL_1B, 1024, zero_stage=3, recompute="full" if kind == "ltune" else "none",
                       loss="chunked" if kind == "ltune" else "full").layout()
    n = gv.predicted_longest(gv.MODEL_1B, gpu, layout, safety_margin=0.0)
    assert n > 0 and n % 1024 == 0
    fits = lambda k: estimate_memory(gv.MODEL_1B, gpu, layout, k, safety_margin=0.0).fits_gpu  # noqa: E731
    assert fits(n) and not fits(n + 1024)


def test_ltune_layout_is_predicted_to_reach_twice_transformers_defaults():
    gpu = load_gpu("h100-80g")
    lt = gv.Config(gv.MODEL_1B, 1024, recompute="full", loss="chunked").layout()
    hf = gv.Config(gv.MODEL_1B, 1024, recompute="none", loss="full").layout()
    assert gv.predicted_longest(gv.MODEL_1B, gpu, lt, safety_margin=0.05) >= 2 * gv.predicted_longest(
        gv.MODEL_1B, gpu, hf, safety_margin=0.05)


def test_prediction_splits_tensors_from_reserve():
    p = gv.prediction(gv.Config(gv.MODEL_1B, 8192), load_gpu("h100-80g"))
    reserve = sum(p["terms"][k] for k in gv.RESERVE_TERMS)
    assert p["allocated_bytes"] + reserve == p["total_bytes"]
    assert p["reserved_bytes"] == p["allocated_bytes"] + p["terms"]["fragmentation"]
    assert p["tokens_per_s_per_gpu"] > 0


@pytest.mark.parametrize("name,profile", [
    ("NVIDIA H100 80GB HBM3", "h100-80g"), ("NVIDIA H200", "h200"), ("NVIDIA H100 PCIe", "h100-pcie"),
])
def test_gpu_profile_for(name, profile):
    assert gv.gpu_profile_for(name, None, smoke=False)[0].name == profile
    assert gv.gpu_profile_for(name, None, smoke=True)[0].name == "cpu"


def test_write_data_documents_reach_the_asked_length(tmp_path):
    info = gv.write_data(tmp_path, num_docs=3, doc_tokens=3000)
    lines = Path(info["path"]).read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["text"] for line in lines)
    assert 0.9 * 3000 <= info["tokens_per_doc_min"] <= 1.2 * 3000


def test_trace_file_matches_the_gpu_configurations():
    """bench/gpu_validate_trace.json holds a trace for every GPU configuration (regenerate with
    --write-trace when the matrix changes)."""
    table = json.loads(gv.TRACE_FILE.read_text())["configs"]
    setup = gv.gpu_setup()
    keys = [gv.Config(setup.model, n).key for n in setup.a_seq_lens] + [c.key for c in setup.matrix]
    assert sorted(keys) == sorted(table)
    for key in keys:
        assert table[key]["comparable_traced_bytes"] > 0
