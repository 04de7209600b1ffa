"""Step time v2: each term against a hand computation, and the model against published runs."""

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

from ltune.planner import throughput as T
from ltune.planner.calibration_data import (
    FITTED_RUNS, HELD_OUT_MOSAICML, HELD_OUT_RUNS, UNPROFILED_RUNS, PublishedRun,
)
from ltune.planner.schema import Layout
from ltune.planner.shape import Shape
from ltune.profiles import load_gpu, load_model

# Llama-3.1-8B (config.json): hidden 4096, 32 heads x 128, 8 kv heads, MLP 14336, 32 layers, vocab 128256
L, H, Q, KV, I, V = 32, 4096, 4096, 1024, 14336, 128256
LAYER = H * Q + 2 * H * KV + Q * H + 3 * H * I + 2 * H  # 218,112,000 (q, k, v, o, gate/up/down, 2 norms)


@pytest.fixture
def s8k():
    return Shape.of(load_model("llama3.1-8b"), 8192)


def test_matmul_flops_by_hand(s8k):
    """6 FLOPs per layer parameter and token, 2 more per recomputed forward, 6 per head parameter."""
    assert LAYER == 218_112_000
    assert T.matmul_flops_per_token(s8k, 0.0) == 6 * L * LAYER + 6 * V * H == 45_029_523_456
    assert T.matmul_flops_per_token(s8k, 1.0) - T.matmul_flops_per_token(s8k, 0.0) == 2 * L * LAYER


def test_attention_is_the_causal_half(s8k):
    """Flash kernels skip the masked half: forward 2*d*Q per layer and token for d = 8192, backward
    2.5x forward (FlashAttention's benchmark convention), not PaLM's 12*L*Q*T."""
    fwd = 2 * 8192 * Q * L
    assert T.attention_flops_per_token(s8k, "varlen", 0.0) == fwd * 3.5 == 7_516_192_768
    assert T.attention_flops_per_token(s8k, "varlen", 1.0) == fwd * 4.5
    # eager attention computes the whole score matrix: twice the causal kernel's work
    assert T.attention_flops_per_token(s8k, "eager", 0.0) == 2 * fwd * 3.5


def test_attention_per_document_with_doc_tokens():
    model = load_model("llama3.1-8b")
    full = Shape.of(model, 32768)
    docs = Shape.of(model, 32768, doc_tokens=2048)
    assert docs.attention_tokens == 2048 and full.attention_tokens == 32768
    assert T.attention_flops_per_token(docs, "varlen", 1.0) == 2 * 2048 * Q * L * 4.5
    # eager attention over a pack spans the whole sequence whatever the documents
    assert T.attention_flops_per_token(docs, "eager", 0.0) == T.attention_flops_per_token(full, "eager", 0.0)
    # a document longer than the sequence is cut to it; a document of no tokens is an error
    assert Shape.of(model, 4096, doc_tokens=10_000).attention_tokens == 4096
    with pytest.raises(ValueError, match="doc_tokens"):
        Shape.of(model, 4096, doc_tokens=0)


def test_compute_seconds_by_hand(s8k):
    """A100: 312 TFLOPS x 0.87 MAMF x MATMUL_EFFICIENCY for matmuls, 189 TFLOPS (FlashAttention-2
    README chart) x ATTENTION_EFFICIENCY for attention, ELEMENTWISE_PASSES x 2 bytes over each layer's
    4096 + 14336 activations, forward and backward (3 passes' worth), at 2.039 TB/s; 2 sequences of
    8192 tokens per rank."""
    gpu = load_gpu("a100-80g")
    lay = Layout(num_gpus=8, micro_batch_size=2, recompute="none")
    tokens = 2 * 8192
    matmul = tokens * 45_029_523_456 / (312e12 * 0.87 * T.MATMUL_EFFICIENCY)
    attention = tokens * 7_516_192_768 / (189e12 * T.ATTENTION_EFFICIENCY)
    elementwise = tokens * T.ELEMENTWISE_PASSES * 2 * (H + I) * L * 3 / 2.039e12
    assert T.matmul_seconds(s8k, lay, gpu, 0.0) == pytest.approx(matmul, rel=1e-12)
    assert T.attention_seconds(s8k, lay, gpu, 0.0) == pytest.approx(attention, rel=1e-12)
    assert T.elementwise_seconds(s8k, lay, gpu, 0.0) == pytest.approx(elementwise, rel=1e-12)
    assert T.compute_seconds(s8k, lay, gpu) == pytest.approx(matmul + attention + elementwise, rel=1e-12)
    # a recomputed forward adds one more pass: 4/3 of the memory-bound time
    assert T.elementwise_seconds(s8k, lay, gpu, 1.0) == pytest.approx(elementwise * 4 / 3, rel=1e-12)


def test_memory_bound_share_grows_with_flops_per_byte(s8k):
    """The same step on H100 (989 TFLOPS x 0.80 MAMF over 3.35 TB/s: 236 FLOPs per byte) loses a
    larger share to memory-bound work than on A100 (312 x 0.87 over 2.039: 133 per byte)."""
    lay = Layout(num_gpus=8, recompute="none")

    def share(gpu):
        return T.elementwise_seconds(s8k, lay, gpu, 0.0) / T.matmul_seconds(s8k, lay, gpu, 0.0)

    a100, h100 = share(load_gpu("a100-80g")), share(load_gpu("h100-80g"))
    assert h100 / a100 == pytest.approx((989e12 * 0.80 / 3.35e12) / (312e12 * 0.87 / 2.039e12), rel=1e-3)


def test_zero3_traffic_and_its_overlap(s8k):
    """Two parameter gathers and one gradient reduce-scatter per micro-batch, recompute or not;
    across two nodes the ring runs one channel through each of the 8 NICs of 24 GB/s: 192 GB/s,
    under NVLink's 235; ZERO3_OVERLAP of it hides under compute."""
    gpu = load_gpu("a100-80g")
    lay = Layout(num_gpus=16, zero_stage=3)
    hand = 3 * 2 * 8_030_261_248 * 15 / 16 / (8 * 24e9)
    assert T.zero_comm_seconds(s8k, lay, gpu) == (pytest.approx(hand, rel=1e-12), 0.0)
    assert T.exposed_zero3_seconds(10.0, 100.0) == pytest.approx(10.0 * (1 - T.ZERO3_OVERLAP))
    assert T.exposed_zero3_seconds(10.0, 0.05) == pytest.approx(9.95)  # compute too short to hide it
    step, exposed = T.step_seconds(s8k, lay, gpu)
    compute = T.compute_seconds(s8k, lay, gpu)
    assert exposed == pytest.approx(T.exposed_zero3_seconds(hand, compute), rel=1e-12)
    assert step == pytest.approx(compute + exposed, rel=1e-12)


def test_ring_across_nodes_is_capped_by_nvlink():
    """H100 nodes: 8 NICs of 46 GB/s make 368 GB/s, NVLink's bus bandwidth too; a node of PCIe GPUs
    (h100-pcie: 25 GB/s between GPUs, a 200 Gb/s NIC per two GPUs) is held to its 25 GB/s; V100 nodes
    (a 100 Gb/s NIC per two GPUs, ~6 GB/s a GPU) get their NICs' 48 GB/s, under NVLink's 120."""
    assert T.collective_bandwidth(load_gpu("h100-80g"), 64) == 368e9
    assert T.collective_bandwidth(load_gpu("h100-pcie"), 64) == 25e9
    assert T.collective_bandwidth(load_gpu("v100-32g"), 64) == 8 * 6e9
    assert T.collective_bandwidth(load_gpu("a100-80g"), 8) == 235e9


def test_ulysses_all_to_all_by_hand(s8k):
    """q, k, v and output per layer, forward, backward and recompute, (sp-1)/sp of each over NVLink."""
    gpu = load_gpu("h100-80g")
    lay = Layout(num_gpus=8, sp_degree=4, recompute="full")
    per_layer = 2 * 2048 * (2 * Q + 2 * KV)  # bytes of the rank's 8192/4 tokens
    assert T.ulysses_seconds(s8k, lay, gpu) == pytest.approx(L * 3 * per_layer * 3 / 4 / 368e9, rel=1e-12)


def test_ulysses_across_nodes_by_hand():
    """sp 16 over two A100 nodes at 32k: of each rank's q, k, v and output, 7/16 goes to peers in its
    node over NVLink (235 GB/s) and 8/16 to the other node through its own 24 GB/s NIC, at the same
    time: the NIC's share sets the time."""
    s = Shape.of(load_model("llama3.1-8b"), 32768)
    lay = Layout(num_gpus=16, sp_degree=16, recompute="full")
    volume = L * 3 * 2 * 2048 * (2 * Q + 2 * KV)  # bytes of the rank's 32768/16 tokens
    assert T.ulysses_seconds(s, lay, load_gpu("a100-80g")) == pytest.approx(volume * 8 / 16 / 24e9, rel=1e-12)


@pytest.mark.parametrize("sp, inside, across", [
    (6, 5, 4),    # ranks 0-5 of 24 share a node (5 peers); ranks 6-11 put two on one node, four on the next
    (12, 7, 8),   # ranks 0-11: eight on one node (7 peers); ranks 12-23: four on one node, eight on the next
    (4, 3, 0),    # inside a node
])
def test_ulysses_groups_that_straddle_nodes(sp, inside, across):
    """Ulysses groups are consecutive ranks: on 8-GPU A100 nodes a group can straddle a node boundary;
    the step waits for the rank with the most traffic over NVLink and the one with the most across
    the NIC (the NIC, whenever the group leaves its node). Qwen2.5-1.5B
    (config.json: 28 layers, 12 heads of 128, 2 KV heads), so sp 4, 6 and 12 divide its heads."""
    s = Shape.of(load_model("qwen2.5-1.5b"), 24 * 1024)
    lay = Layout(num_gpus=24, sp_degree=sp, recompute="none")
    volume = 28 * 2 * 2 * (24 * 1024 // sp) * (2 * 1536 + 2 * 256)
    hand = max(volume * inside / sp / 235e9, volume * across / sp / 24e9)
    assert T.ulysses_seconds(s, lay, load_gpu("a100-80g")) == pytest.approx(hand, rel=1e-12)


def test_mfu_keeps_the_palm_convention(s8k):
    th = T.estimate_throughput(s8k, Layout(num_gpus=8), load_gpu("h100-80g"))
    assert th.flops_per_token == 6 * 8_030_261_248 + 12 * L * Q * 8192
    assert th.mfu == pytest.approx(th.tokens_per_s_per_gpu * th.flops_per_token / 989e12, rel=1e-12)


# ------------------------------------------------------------------ published runs


def predicted(run: PublishedRun) -> float:
    s = Shape.of(run.profile(), run.seq_len, doc_tokens=run.doc_tokens)
    return T.estimate_throughput(s, run.layout, load_gpu(run.gpu), run.grad_accum, run.recomputed).tokens_per_s_per_gpu


def _cases(runs, misses: dict[str, str]) -> list:
    """One test case per run, named by its label; a strict xfail with its reason for a documented miss."""
    return [pytest.param(r, id=r.label, marks=pytest.mark.xfail(strict=True, reason=misses[r.label]))
            if r.label in misses else pytest.param(r, id=r.label) for r in runs]


def _calibration():
    """bench/calibration.py as a module, loaded once (registered, as its dataclass needs)."""
    name = "ltune_bench_calibration"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "bench" / "calibration.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_constants_are_the_documented_fit():
    """throughput.py holds the least-squares fit bench/calibration.py computes, to two decimals
    (ELEMENTWISE_PASSES to one)."""
    calibration = _calibration()
    fitted = dict(zip(calibration.NAMES, calibration.fit(FITTED_RUNS)))
    assert T.MATMUL_EFFICIENCY == pytest.approx(fitted["MATMUL_EFFICIENCY"], abs=0.006)
    assert T.ELEMENTWISE_PASSES == pytest.approx(fitted["ELEMENTWISE_PASSES"], abs=0.06)
    assert T.ZERO3_OVERLAP == pytest.approx(fitted["ZERO3_OVERLAP"], abs=0.006)


def test_calibration_set_is_big_and_independent():
    runs = (*FITTED_RUNS, *UNPROFILED_RUNS, *HELD_OUT_RUNS)
    assert len(runs) >= 10 and len({r.origin for r in runs}) >= 3
    # the fit itself sees three sources, so leaving one out still leaves two (7 runs or more) to fit three constants
    assert {r.origin for r in FITTED_RUNS} == {"torchtitan", "xtuner", "mosaicml"}
    assert not {r.label for r in FITTED_RUNS} & {r.label for r in (*HELD_OUT_RUNS, *HELD_OUT_MOSAICML)}
    assert [r.label for r in FITTED_RUNS if r.origin == "xtuner"] == ["XTuner Llama2-7B 8k 8xA100 sp1"]


def test_leave_one_source_out_median_within_15_percent():
    """Each source's runs predicted by constants fitted on the other sources only (issue 13's goal)."""
    errors = [abs(e) for _, _, errs in _calibration().leave_one_source_out(FITTED_RUNS) for _, e in errs]
    assert len(errors) == len(FITTED_RUNS)
    assert statistics.median(errors) <= 0.15


#: llm-foundry's benchmarking README, A100 80GB table, NumParams column: (size, SeqLen) -> parameters
_MPT_NUM_PARAMS = {
    ("7b", 2048): 6_658_859_008, ("7b", 4096): 6_667_247_616, ("7b", 8192): 6_684_024_832,
    ("13b", 2048): 12_853_954_560, ("13b", 4096): 12_864_440_320, ("13b", 8192): 12_885_411_840,
    ("30b", 2048): 29_975_214_080, ("30b", 4096): 29_989_894_144, ("30b", 8192): 30_019_254_272,
    ("70b", 2048): 64_862_437_376,
    ("1b", 2048): 1_315_950_592, ("1b", 4096): 1_320_144_896, ("1b", 8192): 1_328_533_504,
    ("3b", 2048): 2_651_837_440, ("3b", 4096): 2_657_080_320, ("3b", 8192): 2_667_566_080,
}


@pytest.mark.parametrize("run", [r for r in (*FITTED_RUNS, *HELD_OUT_MOSAICML) if r.origin == "mosaicml"],
                         ids=lambda r: r.label)
def test_mpt_standins_have_mpt_parameters(run):
    """The llama stand-ins carry MPT's parameters as published, less its learned positions (SeqLen x d,
    a lookup without matmul FLOPs), within 0.1% (MPT's biases and LayerNorms)."""
    s = Shape.of(run.profile(), run.seq_len)
    size = run.profile().name.split("-")[1]
    published = _MPT_NUM_PARAMS[size, run.seq_len] - run.seq_len * s.hidden_size
    assert s.params == pytest.approx(published, rel=1e-3)


_FITTED_MISSES = {
    "MosaicML MPT-30b 8k 8xA100 AC": (
        "the published 8k micro-batch (8192 tokens) takes 2.84x the 4k one (4096 tokens) of the same 30B, "
        "micro-batch and accumulation; a step whose only super-linear term is causal attention takes at most "
        "2x plus the attention's growth (the model: 2.2x), and MPT-7B and 13B at the same lengths and tokens per "
        "micro-batch take 1.15x; the table does not say what differs in that row: the model is 34% too fast"),
}
@pytest.mark.parametrize("run", _cases(FITTED_RUNS, _FITTED_MISSES))
def test_fitted_runs_within_25_percent(run):
    assert predicted(run) == pytest.approx(run.tokens_per_s_per_gpu, rel=0.25)


_MULTI_NODE_8K = (
    "XTuner's DeepSpeed ZeRO-3 at 8k over 4 nodes is much slower than the model, which is within 2% of the "
    "same models' 64-GPU FSDP runs; XTuner's own Llama2-70B 32k sp4 row on the same 32 GPUs takes 27.2 s a "
    "micro-batch of 8192 tokens a rank against this row's 37.8 s, with more attention and the same ZeRO-3 "
    "traffic per micro-batch: only a cost paid once per optimizer step (accumulation 1 here, 4 there) of about "
    "13 s, which no term of a GPU-resident ZeRO-3 step explains, or an unstated difference between the runs "
    "would; the cluster's network is not published"
)
_MISSES = {
    "XTuner Yi-34B-200K 8k 32xA100 sp1": _MULTI_NODE_8K,
    "XTuner Llama2-70B 8k 32xA100 sp1": _MULTI_NODE_8K,
    "XTuner Yi-34B-200K 256k 32xA100 sp8": (
        "from the 128k sp8 row (within 1%) to 256k sp8 the published time a micro-batch grows 4.2x while the "
        "tokens a rank double: more than causal attention's 4x, the most any term can grow (the model: 3.3x); "
        "the model is 25% too fast"),
    "XTuner Llama2-70B 256k 32xA100 sp16": (
        "sp 16 spans two nodes (half of each all-to-all through the GPU's NIC); XTuner's network is not "
        "published and the model predicts 43% too fast, where the 128k sp8 row inside a node is within 3%"),
    "XTuner Llama2-70B 1M 64xA100 sp64": (
        "sp 64 over 8 nodes with 64 heads (one per rank) and 8 KV heads; XTuner's network is not published and "
        "the model predicts 29% too fast"),
}


@pytest.mark.parametrize("run", _cases(HELD_OUT_RUNS, _MISSES))
def test_held_out_runs_within_25_percent(run):
    """XTuner beyond 8k: no fit ever sees these; attention at the published kernel rate."""
    assert predicted(run) == pytest.approx(run.tokens_per_s_per_gpu, rel=0.25)


@pytest.mark.parametrize("runs", [HELD_OUT_RUNS, HELD_OUT_MOSAICML], ids=["xtuner", "mosaicml"])
def test_held_out_median_within_15_percent(runs):
    errors = [abs(predicted(r) / r.tokens_per_s_per_gpu - 1) for r in runs]
    assert statistics.median(errors) <= 0.15


_MOSAICML_MISSES = {
    "MosaicML MPT-30b 8k 8xH100 AC": (
        "the same row as on A100 (+34%): on H100 too the 8k micro-batch of 30B takes 2.60x the 4k one for 2x the "
        "tokens, where 7B's 8k and 4k rows (equal tokens per micro-batch) differ by 1.24x; the model is 36% too fast"),
}


@pytest.mark.parametrize("run", _cases(HELD_OUT_MOSAICML, _MOSAICML_MISSES))
def test_held_out_mosaicml_runs_within_25_percent(run):
    """llm-foundry's H100 rows and its MPT-1B and 3B rows, chosen by the fitted rows' rule and never fitted:
    the A100 fit carried to another GPU (MAMF, HBM bandwidth, FlashAttention rate) and to narrow models."""
    assert predicted(run) == pytest.approx(run.tokens_per_s_per_gpu, rel=0.25)



def test_long_context_falls_as_the_kernel_predicts():
    """XTuner Llama2-7B from 32k to 256k on 8 A100 (no fit sees them): the model's ratios of
    tokens/s/GPU within 10% of the published ones; PaLM attention without the causal half at one
    efficiency gives 128k/32k about 0.35, the published ratio is 0.42."""
    runs = {r.seq_len: r for r in HELD_OUT_RUNS if r.model == "llama2-7b" and r.layout.num_gpus == 8}
    for seq in (131072, 262144):
        published = runs[seq].tokens_per_s_per_gpu / runs[32768].tokens_per_s_per_gpu
        assert predicted(runs[seq]) / predicted(runs[32768]) == pytest.approx(published, rel=0.10)


@pytest.mark.xfail(strict=True, reason=(
    "the model's ring over 16 nodes moves 127/128 of the payload per link against 7/8 inside one node, at the "
    "same 368 GB/s (8 NICs of 46 GB/s, NVLink's bus bandwidth too): 0.993; the published 0.973 also holds what "
    "no term models (ring latency over 16 nodes, a network below its line rate, stragglers): 0.0204 off"))
def test_multi_node_scaling_of_torchtitan_h100():
    """The H100s are 500 W HBM2e parts no profile describes, but the same GPUs at 8 and at 128
    (16 nodes, ZeRO-3 over the NICs) test the cost of ZeRO-3 across nodes: published 0.973."""
    by_count = {r.layout.num_gpus: r for r in UNPROFILED_RUNS if r.gpu == "h100-80g"}
    published = by_count[128].tokens_per_s_per_gpu / by_count[8].tokens_per_s_per_gpu
    assert predicted(by_count[128]) / predicted(by_count[8]) == pytest.approx(published, abs=0.02)


_UNPROFILED = {
    "h100-80g": "torchtitan's H100s run at 500 W with HBM2e (torchtitan: MFU 33-39% against the SXM peak); the "
    "h100-80g profile is the 700 W SXM5 part, its MAMF and its 3.35 TB/s HBM3, so the model is 28-31% too fast",
    "h20": "the H20's matmul and FlashAttention rates are scaled from H100 (none published); this run needs the "
    "H20 near its whole 148 TFLOPS peak, so the model is 36% too slow",
}


@pytest.mark.parametrize("run", _cases(UNPROFILED_RUNS, {r.label: _UNPROFILED[r.gpu] for r in UNPROFILED_RUNS}))
def test_runs_on_unprofiled_gpus(run):
    assert predicted(run) == pytest.approx(run.tokens_per_s_per_gpu, rel=0.25)


def _row(label: str, seq_len: int, sp: int, accum: int, tps: float) -> PublishedRun:
    return PublishedRun(label, "test", "llama2-7b", "a100-80g", seq_len,
                        Layout(num_gpus=8, zero_stage=3, sp_degree=sp, recompute="full"), tps, source="test",
                        grad_accum=accum)


def test_contradicting_rows_are_found():
    """A 32k sp4 row runs the same 8192 tokens a rank as an 8k sp1 row with 4x the keys per query: it
    cannot be faster per micro-batch unless a per-step cost spread over its 4 micro-batches makes up
    the gap, (8.192 - 6.827) / (1 - 1/4) = 1.82 s; a 16k sp1 row whose micro-batch takes more than 4x
    the 8k one (2x tokens, 4x tokens x keys) exceeds every term's growth."""
    audit = _calibration().contradictions
    short, long_ = _row("8k", 8192, 1, 1, 1000.0), _row("32k", 32768, 4, 4, 1200.0)
    ((a, b, why),) = audit([short, long_])
    assert (a.label, b.label) == ("32k", "8k") and "at least 1.8 s per optimizer step" in why
    assert audit([short, _row("32k", 32768, 4, 4, 900.0)]) == []  # slower: consistent
    ((a, b, why),) = audit([short, _row("16k", 16384, 1, 1, 1000.0 * 2 / 4.2)])
    assert a.label == "16k" and "4.20x its time" in why and "at most 4.00x" in why
    assert audit([short, _row("16k", 16384, 1, 1, 1000.0 * 2 / 3.9)]) == []


def test_published_contradictions_are_the_documented_misses():
    """The audit of the published rows finds the two pairs the held-out misses cite."""
    runs = (*FITTED_RUNS, *UNPROFILED_RUNS, *HELD_OUT_RUNS, *HELD_OUT_MOSAICML)
    found = {(a.label, b.label) for a, b, _ in _calibration().contradictions(runs)}
    assert found == {("XTuner Llama2-70B 32k 32xA100 sp4", "XTuner Llama2-70B 8k 32xA100 sp1"),
                     ("XTuner Yi-34B-200K 256k 32xA100 sp8", "XTuner Yi-34B-200K 128k 32xA100 sp8")}
