"""The search's answers: one global batch for every candidate, the best layout at
every GPU count (offload included), --prefer, --ctx max, and shortfalls and remedies that are
right. Each answer is checked against an independent brute force over the memory model
(estimate_memory, layout by layout) or a hand computation, not against the search's own loop."""

from __future__ import annotations

import json
import math
import time
from itertools import product

import pytest
import yaml
from typer.testing import CliRunner

from ltune.cli import app
from ltune.planner.memory import estimate_memory
from ltune.planner.schema import Layout, check_sp_degree
from ltune.planner.search import Pins, Request, evaluate, longest_context, search
from ltune.profiles import GIB, load_gpu, resolve_model

runner = CliRunner()

#: DeepSpeed's (stage, offload) pairs, written out again here
PAIRS = ((0, "none"), (1, "none"), (1, "optimizer"), (2, "none"), (2, "optimizer"), (3, "none"), (3, "optimizer"),
         (3, "all"))


def request(model="internlm2-20b", seq_len=32768, gpu="a100-80g", *, global_batch=None, tokens_per_step=None,
            prefer="fewest", **pins):
    return Request(model=resolve_model(model), gpu=load_gpu(gpu), seq_len=seq_len, global_batch=global_batch,
                   tokens_per_step=tokens_per_step, prefer=prefer, pins=Pins(**pins))


def default_global_batch(seq_len: int) -> int:
    """4Mi tokens per step in sequences, rounded up to a power of two (by hand, with floats)."""
    return 2 ** math.ceil(math.log2(max(1, math.ceil(4 * 1024 * 1024 / seq_len))))


def every_layout(model, num_gpus: int, micro_batches=(1, 2, 4, 8)):
    """Every layout at one GPU count, enumerated without the search's code."""
    sps = []
    for sp in range(1, num_gpus + 1):
        if num_gpus % sp:
            continue
        try:
            check_sp_degree(sp, model)
        except ValueError:
            continue
        sps.append(sp)
    for (z, o), sp, mb, rc, loss in product(PAIRS, sps, micro_batches, ("full", "none"), ("full", "chunked")):
        yield Layout(num_gpus=num_gpus, zero_stage=z, sp_degree=sp, micro_batch_size=mb, offload=o, recompute=rc,
                     loss=loss)


def overshoot(model, gpu, lay, seq_len) -> int:
    """max(GPU overshoot, host overshoot) from estimate_memory (what MemoryBreakdown.fits checks)."""
    mem = estimate_memory(model, gpu, lay, seq_len)
    return max(mem.total_bytes - mem.usable_bytes, mem.host_bytes_per_node - mem.host_capacity_bytes_per_node)


def splits(global_batch: int, lay: Layout) -> bool:
    return global_batch % (lay.micro_batch_size * lay.dp_degree) == 0


# ---------------------------------------------------------------- one global batch


def test_default_global_batch_is_4mi_tokens_in_sequences():
    assert request(seq_len=8192).sequences_per_step == 512  # 4,194,304 / 8,192
    assert request(seq_len=32768).sequences_per_step == 128
    assert request(seq_len=3000).sequences_per_step == 2048  # ceil(1398.1) = 1399, up to 2^11
    assert request(seq_len=2**23).sequences_per_step == 1
    assert request(seq_len=8192, tokens_per_step=10**6).sequences_per_step == 128  # ceil(122.07) = 123, up to 2^7
    assert request(seq_len=8192, global_batch=96).sequences_per_step == 96
    with pytest.raises(ValueError, match="not both"):
        request(global_batch=8, tokens_per_step=8192)


@pytest.mark.parametrize("prefer", ["fewest", "fastest", "cheapest"])
def test_every_layout_reported_runs_the_same_global_batch(prefer):
    """Equal work: micro-batch x accumulation x data-parallel degree is the global batch for the
    pick, the runners-up, the best at each count and the conventional layout, and each step time
    is the time of that many tokens: tokens/s/GPU x GPUs x step time = global batch x seq_len."""
    req = request(model="llama3.1-70b", seq_len=8192, gpu="h100-80g", prefer=prefer)
    r = search(req)
    assert r.global_batch == 512 and r.tokens_per_step == 512 * 8192
    reported = [r.best, *r.runners_up, r.conventional, *(pc.best for pc in r.per_count if pc.best)]
    reported += [r.no_offload] if r.no_offload else []
    for ev in reported:
        lay = ev.layout
        assert lay.micro_batch_size * ev.gradient_accumulation_steps * (lay.num_gpus // lay.sp_degree) == 512
        th = ev.throughput
        assert th.tokens_per_s_per_gpu * lay.num_gpus * th.step_time_s == pytest.approx(512 * 8192, rel=1e-9)


def test_pinned_count_that_cannot_split_the_batch():
    """24 GPUs (3 nodes of 8) and the default power-of-two batch: no layout's data-parallel degree
    (24, 12, 6 or 3) divides 512, so nothing is judged and the count says why; --global-batch 96 splits."""
    r = search(request(model="llama3.1-8b", seq_len=8192, gpu="h100-80g", num_gpus=24))
    assert r.best is None and r.evaluated == 0
    assert "global batch 512" in r.per_count[0].note
    r = search(request(model="llama3.1-8b", seq_len=8192, gpu="h100-80g", num_gpus=24, global_batch=96))
    assert r.best is not None and r.best.global_batch == 96


def test_ranking_compares_whole_optimizer_steps():
    """At each GPU count the pick is the layout with the most tokens/s/GPU over a whole step of
    the global batch (estimate_throughput with the accumulation that reaches it), found by brute
    force over every layout that fits. Per-step costs (the optimizer offload's CPU Adam, ZeRO 1-2's
    gradient reduction) are paid once per optimizer step, so ranking one micro-batch per step
    instead picks other layouts at some of these counts (checked, so the test can tell them apart)."""
    differs = 0
    for n in (1, 2, 4, 8):
        req = request(model="llama3.1-8b", seq_len=8192, gpu="a100-40g", num_gpus=n)
        model, gpu = req.model, req.gpu
        step_best, micro_best = (-1.0, None), (-1.0, None)
        for lay in every_layout(model, n):
            if not splits(512, lay) or overshoot(model, gpu, lay, 8192) > 0:
                continue
            ga = 512 // (lay.micro_batch_size * lay.dp_degree)
            tps = evaluate(req, lay, grad_accum=ga).throughput.tokens_per_s_per_gpu
            if tps > step_best[0] + 1e-6:
                step_best = (tps, lay)
            tps1 = evaluate(req, lay, grad_accum=1).throughput.tokens_per_s_per_gpu
            if tps1 > micro_best[0] + 1e-6:
                micro_best = (tps1, lay)
        r = search(req)
        assert r.best.throughput.tokens_per_s_per_gpu == pytest.approx(step_best[0], rel=1e-9), n
        assert r.best.layout == step_best[1], n
        differs += micro_best[1] != step_best[1]
    assert differs


def test_plan_states_the_batch_in_json_and_plan_yaml(tmp_path):
    out = tmp_path / "plan.yaml"
    res = runner.invoke(app, ["plan", "-m", "llama3.1-8b", "--ctx", "16384", "--gpu", "h100-80g", "--global-batch",
                              "64", "--json", "-o", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["global_batch"] == 64 and data["tokens_per_step"] == 64 * 16384
    assert data["micro_batch_size"] * data["gradient_accumulation_steps"] * data["dp_degree"] == 64
    assert data["dp_degree"] == data["layout"]["num_gpus"] // data["layout"]["sp_degree"]
    written = yaml.safe_load(out.read_text())
    assert written["training"]["gradient_accumulation_steps"] == data["gradient_accumulation_steps"]
    from ltune.job.ds_config import build_ds_config
    from ltune.planner.io import load_plan

    assert build_ds_config(load_plan(out))["train_batch_size"] == 64


def test_plan_states_the_default_in_help_and_output():
    res = runner.invoke(app, ["plan", "--help"], env={"COLUMNS": "200"})
    text = " ".join(res.output.split())
    assert "--global-batch" in text and "--tokens-per-step" in text and "4,194,304" in text
    assert "fewest|fastest|cheapest" in text and "max" in text
    res = runner.invoke(app, ["plan", "-m", "llama3.1-8b", "--ctx", "8192"], env={"COLUMNS": "200"})
    text = " ".join(res.output.split())
    assert "global batch: 512 sequences = 4,194,304 tokens per optimizer step" in text
    assert "default 4,194,304 tokens per step" in text


@pytest.mark.parametrize("args, message", [
    (["--global-batch", "8", "--tokens-per-step", "65536"], "give one, not both"),
    (["--prefer", "slowest"], "--prefer must be one of fewest, fastest, cheapest (got 'slowest')"),
    (["--global-batch", "0"], "--global-batch"),
])
def test_batch_and_prefer_input_errors(args, message):
    res = runner.invoke(app, ["plan", "-m", "llama3.1-8b", "--ctx", "8192", *args])
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())


# ---------------------------------------------------------------- every count, and --prefer


def test_prefer_fastest_and_cheapest_against_the_per_count_table():
    """fastest: the shortest optimizer step of all counts; cheapest: the fewest GPU-hours per
    million tokens, computed here from the step time (GPUs x step / 3600 / (tokens per step / 1e6))."""
    per = {}
    for prefer in ("fewest", "fastest", "cheapest"):
        per[prefer] = search(request(model="llama3.1-70b", seq_len=8192, gpu="h100-80g", prefer=prefer))
    bests = [pc.best for pc in per["fewest"].per_count if pc.best]
    tokens = 512 * 8192

    def gpu_hours_per_mtok(ev):
        return ev.layout.num_gpus * ev.throughput.step_time_s / 3600 / (tokens / 1e6)

    fastest = min(bests, key=lambda ev: ev.throughput.step_time_s)
    cheapest = min(bests, key=gpu_hours_per_mtok)
    assert per["fastest"].best.layout == fastest.layout
    assert per["cheapest"].best.layout == cheapest.layout
    assert per["cheapest"].best.gpu_hours_per_million_tokens == pytest.approx(gpu_hours_per_mtok(cheapest), rel=1e-9)
    assert per["fewest"].best.layout.num_gpus == min(ev.layout.num_gpus for ev in bests) == 16
    assert fastest.layout.num_gpus > 16


# ---------------------------------------------------------------- shortfalls and remedies


def test_405b_closest_per_count_is_the_smallest_miss_over_every_layout():
    """The 405b at 32k on H100 named a 1-GPU ZeRO-1 layout over by 1,679 GiB as the
    closest while 512 GPUs miss by 12.8 GiB. Per GPU count, the shortfall is the least overshoot
    of every layout there (brute force with estimate_memory), and the closest is the least of
    those, far from 1 GPU. (--global-batch 1024 lets every count split the batch. The generic
    405b now has Llama 3.1 405B's shape, 8 kv heads, and fits on 64 GPUs: --max-gpus 32 keeps
    every count short.)"""
    req = request(model="405b", seq_len=32768, gpu="h100-80g", global_batch=1024, max_gpus=32)
    r = search(req)
    assert r.best is None
    by_count = {pc.num_gpus: pc.shortfall for pc in r.per_count}
    for n in (1, 8, 32):
        want = min(overshoot(req.model, req.gpu, lay, 32768) for lay in every_layout(req.model, n) if splits(1024, lay))
        sf = by_count[n]
        assert max(sf.over_bytes, sf.host_over_bytes) == want, n
    assert max(by_count[1].over_bytes, by_count[1].host_over_bytes) > 1000 * GIB
    closest = r.closest.shortfall
    assert max(closest.over_bytes, closest.host_over_bytes) == min(
        max(sf.over_bytes, sf.host_over_bytes) for sf in by_count.values())
    assert closest.num_gpus == 32 and closest.over_bytes < max(by_count[1].over_bytes, by_count[1].host_over_bytes) / 10


def test_remedies_are_not_already_applied_and_ordered_by_saving():
    """The 405b with --offload optimizer pinned used to be told to `--offload optimizer`. Each
    remedy now changes something the closest layout does not already have, its saving is the
    overshoot before less the overshoot re-judged with the change (estimate_memory here), and
    the largest saving comes first."""
    req = request(model="405b", seq_len=32768, gpu="h100-80g", offload="optimizer", max_gpus=32)
    r = search(req)
    closest = r.closest
    before = overshoot(req.model, req.gpu, closest.shortfall.layout, 32768)
    remedies = closest.remedies
    assert remedies
    assert [rm.saving_bytes for rm in remedies] == sorted((rm.saving_bytes for rm in remedies), reverse=True)
    assert all(rm.saving_bytes > 0 for rm in remedies)
    assert not any(rm.change.startswith("--offload optimizer") for rm in remedies)
    unpin = [rm for rm in remedies if rm.change.startswith("unpin --offload optimizer")]
    assert len(unpin) == 1 and unpin[0].layout.offload != "optimizer"
    after = overshoot(req.model, req.gpu, unpin[0].layout, 32768)
    assert unpin[0].over_bytes_after == after and unpin[0].saving_bytes == before - after
    bigger = [rm for rm in remedies if rm.change.startswith("--gpu ")]
    assert len(bigger) == 1 and bigger[0].layout == closest.shortfall.layout
    name = bigger[0].change.split()[1]
    assert bigger[0].over_bytes_after == overshoot(req.model, load_gpu(name), bigger[0].layout, 32768)


def test_remedy_more_gpus_past_the_pin():
    """llama2-70b at 128k pinned to 4 GPUs: the count that fits is found by doubling, and the
    remedy names it; the saving is re-judged on that layout."""
    req = request(model="llama2-70b", seq_len=131072, num_gpus=4)
    r = search(req)
    more = [rm for rm in r.closest.remedies if rm.change.startswith("--gpus ")]
    assert len(more) == 1 and more[0].fits
    n = more[0].layout.num_gpus
    assert more[0].change.startswith(f"--gpus {n} ")
    smaller = request(model="llama2-70b", seq_len=131072, num_gpus=n // 2)
    assert search(smaller).best is None  # the first doubling that fits
    assert overshoot(req.model, req.gpu, more[0].layout, 131072) == more[0].over_bytes_after


# ---------------------------------------------------------------- the longest context


def test_memory_grows_with_the_context_for_every_layout():
    """What --ctx max's bisection relies on: per layout, GPU and host memory never fall as seq_len grows."""
    model, gpu = resolve_model("qwen2.5-1.5b"), load_gpu("a10")
    lengths = [1024 * k for k in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89)] + [4095, 4096, 4097]
    for lay in every_layout(model, 4):
        totals = [estimate_memory(model, gpu, lay, L) for L in sorted(lengths)]
        assert all(a.total_bytes <= b.total_bytes for a, b in zip(totals, totals[1:])), lay
        assert all(a.host_bytes_per_node <= b.host_bytes_per_node for a, b in zip(totals, totals[1:])), lay


@pytest.mark.parametrize("pins, granularity, upper", [
    ({"num_gpus": 1}, 2048, 96 * 1024),
    ({"max_gpus": 2}, 8192, 160 * 1024),
])
def test_ctx_max_equals_a_brute_force_scan(pins, granularity, upper):
    """The longest multiple of the granularity at which any layout (any micro-batch) fits and
    splits the default global batch, scanned length by length with estimate_memory."""
    model, gpu = resolve_model("qwen2.5-1.5b"), load_gpu("a10")
    counts = [pins["num_gpus"]] if "num_gpus" in pins else [1, 2]
    layouts = [lay for n in counts for lay in every_layout(model, n)]
    want = None
    for L in range(granularity, upper + 1, granularity):
        g = default_global_batch(L)
        if any(splits(g, lay) and overshoot(model, gpu, lay, L) <= 0 for lay in layouts):
            want = L
    got = longest_context(Request(model=model, gpu=gpu, seq_len=1024, pins=Pins(**pins)), granularity, upper)
    assert want is not None and want < upper  # the answer lies inside the range scanned
    assert got.seq_len == want


def test_ctx_max_on_the_command_line_is_quick():
    start = time.perf_counter()
    res = runner.invoke(app, ["plan", "-m", "llama3.1-70b", "--ctx", "max", "--gpus", "16", "--gpu", "h100-80g",
                              "--json"])
    took = time.perf_counter() - start
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    longest = data["longest_context"]["seq_len"]
    assert data["seq_len"] == longest and longest % 1024 == 0 and data["fits"]
    beyond = runner.invoke(app, ["plan", "-m", "llama3.1-70b", "--ctx", str(longest + 1024), "--gpus", "16",
                                 "--gpu", "h100-80g"])
    assert beyond.exit_code == 1
    assert took < 1.0


@pytest.mark.parametrize("value", ["maximum", "-5", "0", "1e5", "9" * 30, "9" * 5000])
def test_ctx_values_that_are_not_a_length(value):
    res = runner.invoke(app, ["plan", "-m", "llama3.1-8b", "--ctx", value])
    assert res.exit_code == 2 and "--ctx" in res.stderr and len(res.stderr.splitlines()) == 1
