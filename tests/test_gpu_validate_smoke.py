"""bench/gpu_validate/'s pure parts: the longest-context search, the planner's predicted
longest context, the prediction keys, the GPU profile match, the data generator, the traces.

The GPU run itself (and its CPU smoke mode, ~2-3 min here) is not run by the suite:
``bash bench/gpu_validate.sh --cpu-smoke``.

Hand-computed parameter counts (the fp32 master copy takes 4 bytes and Adam's two fp32 moments
8 per parameter; one GPU, so every ZeRO stage holds them whole):

- the bench's 0.85B llama (hidden 2048, 16 layers, 32/8 heads of 128, ffn 5632, vocab 32000,
  untied): per layer q 2048*2048 + k, v 2 * 2048*512 + o 2048*2048 + mlp 3*2048*5632 + norms
  2*2048 = 45,092,864; 16 layers + embeddings 2 * 32000*2048 + final norm 2048 = 852,559,872.
- qwen2.5-0.5b (hidden 896, 24 layers, 14/2 heads of 64, ffn 4864, vocab 151936, tied, qkv
  bias): per layer 896*896+896 + 2 * (896*128+128) + 896*896 + 3*896*4864 + 2*896 =
  14,912,384; 24 layers + 151936*896 + 896 = 494,032,768 (Qwen's 0.49B).
- the smoke llama (hidden 64, 2 layers, 4/2 heads of 16, ffn 128, vocab 512, untied): per layer
  4096 + 2*2048 + 4096 + 3*64*128 + 128 = 36,992; 2 layers + 2 * 512*64 + 64 = 139,584.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.gpu_validate import configs, longest_context, prediction, traces  # noqa: E402
from bench.gpu_validate.common import RESERVE_TERMS, TRACE_FILE  # noqa: E402
from bench.gpu_validate.data import write_data  # noqa: E402
from ltune.planner.memory import estimate_memory  # noqa: E402
from ltune.profiles import load_gpu  # noqa: E402

PARAMS_BY_HAND = {"llama-1b-bench": 852_559_872, "qwen2.5-0.5b": 494_032_768, "tiny-smoke": 139_584}


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


def _search(gpu, *, time_s=1e9, known_ok=0, bisections=2, est=lambda n: 1.0, start=8192, granularity=4096):
    return longest_context.search_longest(
        gpu.run_batch, start=start, granularity=granularity, bisections=bisections, known_ok=known_ok,
        upper=1 << 21, time_left=lambda: time_s, estimate_s=est, overhead_s=lambda: 10.0,
    )


# By hand, start 8192, granularity 4096, upper 2**21: the doubling contexts (8192 ... 2**21) go
# to one process, which stops at the first above the limit; then each midpoint (rounded down to
# 4096) in a process of its own, until the bracket is one granularity wide:
# [floor(limit / 4096) * 4096, + 4096].
DOUBLING = [8192 << k for k in range(9)]  # 8192 ... 2097152


@pytest.mark.parametrize("limit,longest_ok,first_oom,tried,midpoints", [
    (20_000, 16384, 20480, [8192, 16384, 32768], [24576, 20480]),
    (40_000, 36864, 40960, [8192, 16384, 32768, 65536], [49152, 40960, 36864]),
    (300_000, 299008, 303104, [8192, 16384, 32768, 65536, 131072, 262144, 524288],
     [393216, 327680, 294912, 311296, 303104, 299008]),
])
def test_search_brackets_the_limit(limit, longest_ok, first_oom, tried, midpoints):
    gpu = FakeGpu(limit)
    r = _search(gpu, bisections=6)
    assert (r["longest_ok"], r["first_oom"]) == (longest_ok, first_oom)
    assert [p["seq_len"] for p in r["probes"]] == tried + midpoints
    assert gpu.batches == [DOUBLING] + [[m] for m in midpoints]  # doubling in one process, each midpoint alone
    assert r["stopped"] is None


@pytest.mark.parametrize("kind,known_ok,longest_ok,first_oom,tried", [
    # transformers' defaults, fake OOM above 700: 256, 512 ok, 1024 fails; midpoint 768 fails
    ("hf", 0, 512, 768, [256, 512, 1024, 768]),
    # ltune, fake OOM above 1500, 256 and 512 known from trainer_runs: 1024 ok, 2048 fails; 1536 fails
    ("ltune", 512, 1024, 1536, [1024, 2048, 1536]),
])
def test_cpu_smoke_search_finds_the_fake_limits(kind, known_ok, longest_ok, first_oom, tried):
    """What --cpu-smoke's longest_context must report, from smoke_setup's sizes and fake OOM caps."""
    setup = configs.smoke_setup()
    gpu = FakeGpu(setup.fake_oom_tokens[kind])
    r = longest_context.search_longest(
        gpu.run_batch, start=setup.search_start, granularity=setup.search_granularity,
        bisections=setup.search_bisections, known_ok=known_ok, upper=setup.search_max,
        time_left=lambda: 1e9, estimate_s=lambda n: 1.0, overhead_s=lambda: 1.0,
    )
    assert (r["longest_ok"], r["first_oom"]) == (longest_ok, first_oom)
    assert [p["seq_len"] for p in r["probes"]] == tried


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

    r = longest_context.search_longest(run_batch, start=8192, granularity=4096, bisections=2, upper=1 << 20,
                                       time_left=lambda: 1e9, estimate_s=lambda n: 1.0, overhead_s=lambda: 1.0)
    assert r["longest_ok"] == 0 and r["first_oom"] is None and "error" in r["stopped"]


def test_known_ok_is_the_longest_trainer_run_that_trained():
    runs = [{"config": configs.trainer_config(configs.MODEL_1B, n).key, "outcome": o}
            for n, o in ((8192, "ok"), (32768, "ok"), (65536, "oom"))]
    assert longest_context.known_ok_from_trainer_runs({"checks": {"trainer_runs": {"runs": runs}}}) == 32768


@pytest.mark.parametrize("kind", ["ltune", "hf"])
def test_predicted_longest_is_the_planner_boundary(kind):
    gpu = load_gpu("h100-80g")
    layout = configs.longest_context_config(kind, configs.MODEL_1B, 1024).layout()
    n = prediction.predicted_longest(configs.MODEL_1B, gpu, layout, safety_margin=0.0)
    assert n > 0 and n % 1024 == 0
    fits = lambda k: estimate_memory(configs.MODEL_1B, gpu, layout, k, safety_margin=0.0).fits_gpu  # noqa: E731
    assert fits(n) and not fits(n + 1024)


def test_ltune_layout_is_predicted_to_reach_twice_transformers_defaults():
    gpu, m = load_gpu("h100-80g"), configs.MODEL_1B
    lt = configs.longest_context_config("ltune", m, 1024).layout()
    hf = configs.longest_context_config("hf", m, 1024).layout()
    assert prediction.predicted_longest(m, gpu, lt, safety_margin=0.05) >= 2 * prediction.predicted_longest(
        m, gpu, hf, safety_margin=0.05)


def test_prediction_splits_tensors_from_reserve():
    p = prediction.prediction(configs.Config(configs.MODEL_1B, 8192), load_gpu("h100-80g"))
    reserve = sum(p["terms"][k] for k in RESERVE_TERMS)
    assert p["allocated_bytes"] + reserve == p["total_bytes"]
    assert p["reserved_bytes"] == p["allocated_bytes"] + p["terms"]["fragmentation"]
    params = PARAMS_BY_HAND["llama-1b-bench"]
    assert (p["terms"]["master_weights"], p["terms"]["optimizer_states"]) == (4 * params, 8 * params)
    assert p["terms"]["weights"] == 2 * params  # ZeRO-3 on one GPU: every parameter once, in bf16
    # one GPU, one sequence of 8192 tokens per optimizer step
    assert p["tokens_per_s_per_gpu"] == pytest.approx(8192 / p["step_time_s"], rel=1e-9)


@pytest.mark.parametrize("name,profile", [
    ("NVIDIA H100 80GB HBM3", "h100-80g"), ("NVIDIA H200", "h200"), ("NVIDIA H100 PCIe", "h100-pcie"),
])
def test_gpu_profile_for(name, profile):
    assert prediction.gpu_profile_for(name, None, smoke=False)[0].name == profile
    assert prediction.gpu_profile_for(name, None, smoke=True)[0].name == "cpu"


def test_write_data_documents_reach_the_asked_length(tmp_path):
    info = write_data(tmp_path, num_docs=3, doc_tokens=3000)
    lines = Path(info["path"]).read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["text"] for line in lines)
    assert 0.9 * 3000 <= info["tokens_per_doc_min"] <= 1.2 * 3000


def test_trace_of_the_smoke_trainer_config_holds_the_model_states():
    """--cpu-smoke traces each configuration; tiny-smoke at 256 tokens, ZeRO-3 on one process."""
    cfg = configs.trainer_config(configs.MODEL_TINY, 256)
    t = traces.trace_config(cfg)
    params = PARAMS_BY_HAND["tiny-smoke"]
    assert (t["terms"]["master_weights"], t["terms"]["optimizer_states"]) == (4 * params, 8 * params)
    assert t["comparable_traced_bytes"] == sum(t["terms"].values())  # no untraced term in the trace


def test_trace_file_matches_the_gpu_configurations():
    """bench/gpu_validate_trace.json holds a trace for every GPU configuration (regenerate with
    ``python -m bench.gpu_validate --write-trace`` when the matrix changes)."""
    table = json.loads(TRACE_FILE.read_text())["configs"]
    keys = [cfg.key for cfg in traces.gpu_trace_configs()]
    assert sorted(keys) == sorted(table)
    for cfg in traces.gpu_trace_configs():
        terms, params = table[cfg.key]["terms"], PARAMS_BY_HAND[cfg.model.name]
        assert (terms["master_weights"], terms["optimizer_states"]) == (4 * params, 8 * params), cfg.key
        assert table[cfg.key]["comparable_traced_bytes"] == sum(terms.values()), cfg.key
