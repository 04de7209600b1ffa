"""bench/gpu_validate/'s pure parts: the longest-context search, the planner's predicted
longest context, the prediction keys, the GPU profile match, the data generator, the traces.

The whole GPU run's CPU smoke mode (``bash bench/gpu_validate.sh --cpu-smoke``, ~4-5 min here)
is not run by the suite; its memory matrix is (test_cpu_smoke_memory_matrix_runs_every_row_type,
~2 min on 2 cores: every row type of the GPU matrix, one worker process; DeepSpeed's CPU Adam op
must be built, cached in TORCH_EXTENSIONS_DIR, or the first run adds ~2 min to build it).

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
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.gpu_validate import configs, longest_context, memory_matrix, prediction, traces  # noqa: E402
from bench.gpu_validate.common import RESERVE_TERMS, TRACE_FILE  # noqa: E402
from bench.gpu_validate.data import write_data  # noqa: E402
from ltune.planner.memory import estimate_memory  # noqa: E402
from ltune.profiles import load_gpu  # noqa: E402

GIB = 2**30
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
        # on the GPU: none under offload; over 2 ranks (sp 2) half of each tensor (all have even sizes)
        on_gpu = 0 if cfg.offload != "none" else params // cfg.num_gpus
        assert (terms["master_weights"], terms["optimizer_states"]) == (4 * on_gpu, 8 * on_gpu), cfg.key
        assert table[cfg.key]["comparable_traced_bytes"] == sum(terms.values()), cfg.key


# ---------------------------------------------------------------- memory_matrix's layout rows

# The layout rows every matrix must hold, by (zero_stage, offload, micro_batch_size, sp_degree,
# loss), in order: most informative first.
LAYOUT_ROWS = [
    (3, "optimizer", 1, 1, "full"),
    (3, "all", 1, 1, "full"),
    (2, "none", 1, 1, "full"),
    (1, "none", 1, 1, "chunked"),
    (3, "none", 1, 2, "chunked"),
    (3, "none", 2, 1, "full"),
    (3, "none", 1, 1, "chunked"),
    (3, "none", 1, 1, "full"),
]


def _layout_of(cfg):
    return (cfg.zero_stage, cfg.offload, cfg.micro_batch_size, cfg.sp_degree, cfg.loss)


@pytest.mark.parametrize("setup", [configs.gpu_setup(), configs.smoke_setup()], ids=["gpu", "smoke"])
def test_matrix_starts_with_every_layout_row(setup):
    rows = setup.matrix[: len(LAYOUT_ROWS)]
    assert [_layout_of(c) for c in rows] == LAYOUT_ROWS
    assert all(c.note for c in rows)  # each says what it checks
    assert [c.trace_only for c in setup.matrix] == [c.sp_degree == 2 for c in setup.matrix]
    sp = rows[4]
    assert (sp.num_gpus, sp.layout().dp_degree) == (2, 1)  # sp 2 over 2 GPUs, no data parallelism
    # the chunked/full pair differs in the loss (and its chunk) only
    chunked, full = rows[6], rows[7]
    assert (chunked.model, chunked.seq_len, chunked.zero_stage, chunked.recompute) == (
        full.model, full.seq_len, full.zero_stage, full.recompute)


def test_gpu_offload_and_zero2_rows_pair_with_the_trainer_run():
    """Each many-parameter layout row is trainer_runs' first run (llama-1b 8k ZeRO-3, full
    recompute, full loss) with one setting changed."""
    setup = configs.gpu_setup()
    base = configs.trainer_config(setup.model, setup.trainer_seq_lens[0])
    changed = {(3, "optimizer"): "offload", (3, "all"): "offload", (2, "none"): "zero_stage"}
    for cfg in setup.matrix[:3]:
        diff = [f for f in ("model", "seq_len", "zero_stage", "recompute", "loss", "offload", "micro_batch_size")
                if getattr(cfg, f) != getattr(base, f)]
        assert diff == [changed[(cfg.zero_stage, cfg.offload)]], cfg.key
    # ZeRO-2's reduce bucket at its cap needs P > 500M elements; ZeRO-1's below it, P < 500M
    assert PARAMS_BY_HAND[setup.matrix[2].model.name] > 500_000_000 > PARAMS_BY_HAND[setup.matrix[3].model.name]


def test_gpu_layout_rows_keys_are_new_and_older_keys_unchanged():
    """Offload, GPUs and sp enter the key only when not the default (the trace file's older keys hold)."""
    q = configs.resolve_model("qwen2.5-0.5b")
    assert configs.Config(q, 8192).key == "qwen2.5-0.5b|ctx=8192|z=3|rc=full|loss=full|attn=varlen|mb=1|chunk=4096"
    keys = [c.key for c in configs.gpu_setup().matrix]
    assert len(set(keys)) == len(keys)
    assert keys[0].endswith("|off=optimizer") and keys[4].endswith("|gpus=2|sp=2")


def test_term_groups_by_hand():
    """Measured groups from the allocator's moments (GiB, by hand): baseline 1, after init 3,
    after step 1 and 2: 5, peak 9, reserved 10, device used 11.5; so states+buffers 5 - 1 = 4,
    moments 5 - 3 = 2, step transients 9 - 5 = 4, fragmentation 10 - 9 = 1, outside 11.5 - 10 = 1.5."""
    measured = {
        "outcome": "ok", "baseline_allocated_bytes": 1 * GIB, "after_init": {"allocated_bytes": 3 * GIB},
        "steps": [{"allocated_bytes": 5 * GIB}, {"allocated_bytes": 5 * GIB}],
        "peak_allocated_bytes": 9 * GIB, "peak_reserved_bytes": 10 * GIB, "device_used_bytes": int(11.5 * GIB),
        "nvidia_smi_process_bytes": 11 * GIB,
    }
    terms = {"weights": 1 * GIB, "master_weights": 1 * GIB, "optimizer_states": 2 * GIB, "gradients": GIB // 2,
             "gradients_fp32": 0, "zero_buffers": GIB // 2, "activations_checkpoints": GIB, "activations_layer": GIB,
             "logits_loss": GIB, "cuda_context": GIB // 2, "comm_buffers": 0, "fragmentation": GIB // 4}
    pred = {"terms": terms, "allocated_bytes": 8 * GIB}  # the tensor terms above: 1+1+2+0.5+0.5+1+1+1
    g = memory_matrix.term_groups(measured, pred, persistent_buffers_bytes=GIB // 4)
    assert g["model_states_and_buffers"] == {"predicted": 4 * GIB + GIB // 4, "measured": 4 * GIB, "error_pct": 6.25}
    assert g["optimizer_states"] == {"predicted": 2 * GIB, "measured": 2 * GIB, "error_pct": 0.0}
    assert g["activations_and_loss"]["predicted"] == 8 * GIB - (4 * GIB + GIB // 4)
    assert g["activations_and_loss"]["measured"] == 4 * GIB
    assert g["fragmentation"] == {"predicted": GIB // 4, "measured": GIB, "error_pct": -75.0}
    assert g["outside_allocator"]["measured"] == int(1.5 * GIB) and g["outside_allocator"]["predicted"] == GIB // 2
    assert g["outside_allocator"]["nvidia_smi_process_bytes"] == 11 * GIB
    # on CPU (no allocator statistics) or without a run, nothing is measured
    cpu = memory_matrix.term_groups({"outcome": "ok", "steps": [{"peak_rss_bytes": 1}]}, pred, 0)
    assert all(cpu[k]["measured"] is None for k in ("model_states_and_buffers", "optimizer_states", "activations_and_loss"))


def test_sp2_trace_row_holds_half_the_tokens_per_rank():
    """The sp 2 row's trace is one rank's: seq_len / 2 tokens, whose layer checkpoints (one hidden
    state of hidden_size bf16 per token per layer, kept under full recompute) are those of a
    one-GPU trace at seq_len / 2."""
    sp = configs.smoke_setup().matrix[4]
    half = configs.Config(sp.model, sp.seq_len // 2, zero_stage=3, loss=sp.loss, loss_chunk_tokens=sp.loss_chunk_tokens)
    t_sp, t_half = traces.trace_config(sp), traces.trace_config(half)
    assert sp.seq_len == 512
    layers, hidden = sp.model.num_layers, sp.model.hidden_size
    assert t_sp["terms"]["activations_checkpoints"] >= layers * 256 * hidden * 2
    assert t_sp["terms"]["activations_checkpoints"] == t_half["terms"]["activations_checkpoints"]


def _smoke_matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("gv_smoke")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/ltune/torch_extensions"))
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_validate", "--cpu-smoke", "--only", "memory_matrix",
                           "--out", str(out), "--budget-s", "400", "--matrix-budget-s", "360"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())["checks"]["memory_matrix"]


@pytest.fixture(scope="module")
def smoke_matrix(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return _smoke_matrix(tmp_path_factory)


def test_cpu_smoke_memory_matrix_runs_every_row_type(smoke_matrix):
    out, check = smoke_matrix
    setup = configs.smoke_setup()
    rows = check["rows"]
    assert [r["config"] for r in rows] == [c.key for c in setup.matrix]
    by_layout = {_layout_of(c): r for c, r in zip(setup.matrix, rows)}
    for cfg, r in zip(setup.matrix, rows):
        m = r["measured"]
        if cfg.trace_only:
            assert m["outcome"] == "trace only" and "NCCL" in m["why"]
            assert r["trace"]["peak_bytes"] > 0 and r["trace_activations"]
            continue
        assert m["outcome"] == "ok", (cfg.key, m.get("error"))
        assert len(m["steps"]) == setup.matrix_steps and all(s["loss"] > 0 for s in m["steps"])
        assert set(r["groups"]) >= {"model_states_and_buffers", "optimizer_states", "activations_and_loss",
                                    "fragmentation", "outside_allocator", "predicted_split"}
        # the micro-batch: micro_batch_size packed sequences of seq_len tokens
        assert m["steps"][0]["input_ids_shape"] == [cfg.micro_batch_size, cfg.seq_len], cfg.key
    # the layout each row claims is the one DeepSpeed ran: its optimizer, its ZeRO optimizer
    expect = {
        (3, "optimizer", 1, 1, "full"): ("DeepSpeedZeroOptimizer_Stage3", "DeepSpeedCPUAdam"),
        (3, "all", 1, 1, "full"): ("DeepSpeedZeroOptimizer_Stage3", "DeepSpeedCPUAdam"),
        (2, "none", 1, 1, "full"): ("DeepSpeedZeroOptimizer", None),
        (1, "none", 1, 1, "chunked"): ("DeepSpeedZeroOptimizer", None),
        (3, "none", 2, 1, "full"): ("DeepSpeedZeroOptimizer_Stage3", None),
    }
    for layout, (wrapper, inner) in expect.items():
        m = by_layout[layout]["measured"]
        assert m["optimizer_wrapper"] == wrapper, layout
        assert (m["optimizer"] == "DeepSpeedCPUAdam") == (inner == "DeepSpeedCPUAdam"), layout
    ds = json.loads((out / "work" / "runs" / "matrix-1" / "ds_config.json").read_text())["zero_optimization"]
    assert ds["offload_param"]["device"] == "cpu" and ds["offload_optimizer"]["device"] == "cpu"
    # the planner's host memory is counted for the offload rows only: 16 B/param of fp32 states on the host
    host = {layout: by_layout[layout]["predicted_host_bytes"] for layout in expect}
    assert host[(3, "optimizer", 1, 1, "full")] >= 16 * PARAMS_BY_HAND["tiny-smoke"] > host[(2, "none", 1, 1, "full")]
