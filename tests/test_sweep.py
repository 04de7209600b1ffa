"""`ltune sweep` and the charts: the cells are the search's answers, the JSON has one cell per
(GPU type, context), the charts are valid PNG/SVG files holding the expected series, and a
missing matplotlib is one line naming what to install."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from ltune.cli import app
from ltune.planner.options import layout_options, parse_tokens, request_from_options
from ltune.planner.search import search
from ltune.planner.sweep import DEFAULT_CONTEXTS, DEFAULT_SWEEP_GPUS, parse_contexts, sweep, sweep_requests
from ltune.profiles import GIB

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(*args: str):
    return runner.invoke(app, list(args))


# ---------------------------------------------------------------- token counts


@pytest.mark.parametrize("text, tokens", [
    ("4096", 4096), ("8k", 8192), ("32K", 32768), ("128k", 131072), ("1m", 1048576), ("1M", 1048576), (" 2m ", 2097152),
])
def test_parse_tokens_suffixes(text, tokens):
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("text", ["", "k", "8g", "1.5k", "-4", "8 k", "eight", "²k"])
def test_parse_tokens_rejects_with_one_line(text):
    with pytest.raises(ValueError) as e:
        parse_tokens(text)
    assert "\n" not in str(e.value) and "token count" in str(e.value)


def test_contexts_parsed_sorted_unique_and_defaults_span_4k_to_1m():
    assert parse_contexts("128k,8k,32k,8192") == (8192, 32768, 131072)
    assert DEFAULT_CONTEXTS == (4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576)
    assert DEFAULT_SWEEP_GPUS == ("a100-80g", "h100-80g", "h200", "b200")
    with pytest.raises(ValueError, match="--ctx"):
        parse_contexts("8k,lots")


# ---------------------------------------------------------------- the cells are the search's answers


CELLS = [("llama3.1-8b", "h100-80g", 262144), ("llama3.1-8b", "a100-80g", 1048576), ("llama3.1-70b", "b200", 131072)]


@pytest.mark.parametrize("model, gpu, ctx", CELLS)
def test_cell_equals_plan_search(model, gpu, ctx):
    """Each cell is what `ltune plan --prefer fewest` recommends, requested independently."""
    req = request_from_options(layout_options(model=model, seq_len=ctx, gpu=gpu))
    expected = search(req).best
    result = sweep(model, sweep_requests({"model": model}, [gpu], [ctx]))
    (cell,) = result.cells
    assert (cell.gpu, cell.seq_len) == (gpu, ctx)
    assert cell.best.layout == expected.layout
    assert cell.num_gpus == expected.layout.num_gpus
    assert cell.tokens_per_s_per_gpu == pytest.approx(expected.throughput.tokens_per_s_per_gpu)
    # a billion tokens cost a thousand times a million's
    assert cell.gpu_hours_per_billion_tokens == pytest.approx(1000 * expected.gpu_hours_per_million_tokens)
    # the fewest: nothing fits at half as many GPUs
    if cell.num_gpus > 1:
        half = search(request_from_options(layout_options(model=model, seq_len=ctx, gpu=gpu,
                                                          num_gpus=cell.num_gpus // 2)))
        assert half.best is None


def test_sweep_visits_every_cell_in_order_and_reports_progress():
    seen = []
    result = sweep("llama3.1-8b", sweep_requests({"model": "llama3.1-8b"}, ["h200", "b200"], [8192, 65536]),
                   on_cell=lambda c: seen.append((c.gpu, c.seq_len)))
    order = [("h200", 8192), ("h200", 65536), ("b200", 8192), ("b200", 65536)]
    assert seen == order == [(c.gpu, c.seq_len) for c in result.cells]
    assert result.gpus == ("h200", "b200") and result.contexts == (8192, 65536)


def test_gpus_needed_never_fall_as_context_grows():
    """Longer sequences need at least as many GPUs (same model, same GPU, same token budget)."""
    result = sweep("llama3.1-8b", sweep_requests({"model": "llama3.1-8b"}, ["a100-80g"], DEFAULT_CONTEXTS))
    counts = [c.num_gpus for c in result.series("a100-80g")]
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] > 1


# ---------------------------------------------------------------- the command


def test_json_shape():
    res = _run("sweep", "--model", "llama3.1-8b", "--ctx", "8k,1m", "--gpu", "h100-80g", "--gpu", "h200,b200",
               "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["gpus"] == ["h100-80g", "h200", "b200"] and out["contexts"] == [8192, 1048576]
    assert [(c["gpu"], c["seq_len"]) for c in out["cells"]] == [
        (g, s) for g in ("h100-80g", "h200", "b200") for s in (8192, 1048576)]
    for c in out["cells"]:
        assert c["fits"] and c["num_gpus"] == c["layout"]["num_gpus"]
        assert c["gpu_hours_per_billion_tokens"] == pytest.approx(1e9 / (c["tokens_per_s_per_gpu"] * 3600))
        assert c["memory_total_bytes"] <= c["usable_bytes"]
        # default 4Mi tokens per step, in whole sequences
        assert c["global_batch"] * c["seq_len"] == 2**22


def test_text_output_names_every_gpu_and_context():
    res = _run("sweep", "--model", "llama3.1-8b", "--ctx", "4k,256k", "--gpu", "a100-80g,b200")
    assert res.exit_code == 0, res.output
    for text in ("a100-80g", "b200", "4k (4,096)", "256k (262,144)", "GPU-h/Btok"):
        assert text in res.stdout


def test_no_cell_fits_exits_1_and_shows_why():
    res = _run("sweep", "--model", "llama3.1-70b", "--ctx", "1m", "--gpu", "a100-80g", "--max-gpus", "2", "--json")
    assert res.exit_code == 1
    (cell,) = json.loads(res.stdout)["cells"]
    assert not cell["fits"] and cell["num_gpus"] is None and cell["closest"]["over_bytes"] > 0


@pytest.mark.parametrize("args, message", [
    (["--ctx", "8x"], "--ctx"),
    (["--gpu", "no-such-gpu"], "no-such-gpu"),
    (["--png", "x.png", "--ctx", "0"], "--ctx"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    res = _run("sweep", "--model", "llama3.1-8b", *args)
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- charts


def _png_ok(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    import matplotlib.image

    pixels = matplotlib.image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200


def test_sweep_png_and_svg(tmp_path):
    pytest.importorskip("matplotlib")
    png, svg = tmp_path / "sweep.png", tmp_path / "sub" / "sweep.svg"
    res = _run("sweep", "--model", "llama3.1-8b", "--ctx", "4k,256k,1m", "--gpu", "a100-80g,b200",
               "--png", str(png), "--svg", str(svg))
    assert res.exit_code == 0, res.output
    _png_ok(png)
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    for name in ("a100-80g", "b200", "GPUs needed", "context length"):
        assert name in text


def test_sweep_chart_series_are_the_cells(tmp_path):
    pytest.importorskip("matplotlib")
    from ltune.charts import sweep_chart

    result = sweep("llama3.1-8b", sweep_requests({"model": "llama3.1-8b"}, ["a100-80g", "b200"], [4096, 1048576]))
    fig = sweep_chart(result, tmp_path / "s.png")
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a100-80g", "b200"]
    lines = {line.get_label(): line for line in ax.get_lines()}
    for gpu in ("a100-80g", "b200"):
        cells = result.series(gpu)
        assert list(lines[gpu].get_xdata()) == [4096, 1048576]
        assert list(lines[gpu].get_ydata()) == [c.num_gpus for c in cells]
    labels = {a.get_text() for a in ax.texts}
    for c in result.cells:  # every cell readable: its GPU count and GPU-hours per billion tokens
        assert f"{c.num_gpus} · {c.gpu_hours_per_billion_tokens:,.0f}" in labels


def test_plan_chart_stacks_terms_against_capacity(tmp_path):
    pytest.importorskip("matplotlib")
    from ltune.charts import memory_chart

    req = request_from_options(layout_options(model="llama3.1-8b", seq_len=131072, gpu="h100-80g"))
    result = search(req)
    evs = [result.best, *result.runners_up]
    fig = memory_chart(evs, [f"l{i}" for i in range(len(evs))], tmp_path / "m.svg", "t", fmt="svg")
    (ax,) = fig.axes
    tops = {}
    for patch in ax.patches:
        x = round(patch.get_x() + patch.get_width() / 2)
        tops[x] = max(tops.get(x, 0.0), patch.get_y() + patch.get_height())
    assert sorted(tops) == list(range(len(evs)))
    for i, ev in enumerate(evs):  # each bar's stack reaches the layout's total
        assert tops[i] == pytest.approx(ev.memory.total_bytes / GIB, rel=1e-9)
    hlines = sorted(line.get_ydata()[0] for line in ax.get_lines())
    capacity = req.gpu.hbm_bytes / GIB
    assert hlines == pytest.approx([capacity * (1 - req.safety_margin), capacity], rel=1e-3)


def test_plan_chart_cli(tmp_path):
    pytest.importorskip("matplotlib")
    png, svg = tmp_path / "plan.png", tmp_path / "plan.svg"
    for path in (png, svg):
        res = _run("plan", "--model", "llama3.1-8b", "--ctx", "128k", "--gpu", "h100-80g", "--chart", str(path))
        assert res.exit_code == 0, res.output
        assert f"wrote chart {path}" in " ".join(res.stdout.split())
    _png_ok(png)
    text = svg.read_text()
    for name in ("pick", "runner-up 1", "GPU capacity", "usable", "weights", "activations"):
        assert name in text
    res = _run("plan", "--model", "llama3.1-8b", "--ctx", "128k", "--chart", str(tmp_path / "plan.pdf"))
    assert res.exit_code == 2 and ".png or .svg" in res.output and not (tmp_path / "plan.pdf").exists()


def test_plan_chart_when_nothing_fits_draws_the_closest(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "closest.svg"
    res = _run("plan", "--model", "llama3.1-70b", "--ctx", "1m", "--gpu", "a100-80g", "--max-gpus", "2",
               "--chart", str(path))
    assert res.exit_code == 1
    assert "closest (does not fit)" in path.read_text()


@pytest.mark.parametrize("args", [
    ["sweep", "--model", "llama3.1-8b", "--ctx", "8k", "--png", "x.png"],
    ["sweep", "--model", "llama3.1-8b", "--ctx", "8k", "--svg", "x.svg"],
    ["plan", "--model", "llama3.1-8b", "--ctx", "8k", "--chart", "x.png"],
])
def test_missing_matplotlib_is_one_line(args, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    res = _run(*args)
    assert res.exit_code == 2, res.output
    (line,) = res.output.strip().splitlines()
    assert 'pip install -e ".[plot]"' in line
    assert not list(tmp_path.iterdir())
