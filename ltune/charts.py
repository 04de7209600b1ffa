"""Charts as PNG or SVG files: the sweep (GPUs needed vs context per GPU type) and a plan's
per-GPU memory breakdown. matplotlib is optional (`pip install -e ".[plot]"`), imported only
here and only when a chart is drawn, on the Agg backend; never prints."""

from __future__ import annotations

from pathlib import Path

from .profiles import GIB

PLOT_INSTALL = 'pip install -e ".[plot]"'
CHART_FORMATS = ("png", "svg")


class ChartError(ValueError):
    """A chart cannot be drawn: matplotlib missing, or a file name ltune cannot draw to."""


def require_matplotlib(flag: str) -> None:
    """A one-line ChartError naming what to install when matplotlib is not importable."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ChartError(f"{flag} needs matplotlib: {PLOT_INSTALL} (or pip install matplotlib)") from None


def chart_format(path: str | Path, flag: str) -> str:
    """png or svg from the file's extension, else a one-line ChartError."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in CHART_FORMATS:
        raise ChartError(f"{flag}: {str(path)!r} must end in .png or .svg")
    return suffix


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, outside pyplot (no global state, nothing to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path, fmt: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable, selectable
        fig.savefig(path, format=fmt, dpi=130)


def _tokens(n: int) -> str:
    """4096 -> 4k, 1048576 -> 1M (exact multiples only), else the number."""
    if n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n % 2**10 == 0:
        return f"{n // 2**10}k"
    return f"{n:,}"


def sweep_chart(result, path: str | Path, fmt: str = "png"):
    """GPUs needed vs context, one line per GPU type on log2 axes, each point annotated with its
    GPU count and GPU-hours per billion tokens; cells with no fit listed under the plot.
    Writes the file; returns the Figure (for tests)."""
    fig = _figure(9.5, 6.0)
    ax = fig.add_subplot()
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    markers = "osD^vP*X"
    no_fit: list[str] = []
    n_series = max(1, len(result.gpus))
    top = 1
    for i, gpu in enumerate(result.gpus):
        cells = result.series(gpu)
        pts = [(c.seq_len, c.num_gpus, c.gpu_hours_per_billion_tokens) for c in cells if c.fits]
        no_fit += [f"{gpu} at {_tokens(c.seq_len)}" for c in cells if not c.fits]
        if not pts:
            ax.plot([], [], marker=markers[i % len(markers)], label=f"{gpu} (no fit)")
            continue
        xs, ys, cost = zip(*pts)
        top = max(top, *ys)
        (line,) = ax.plot(xs, ys, marker=markers[i % len(markers)], linewidth=1.8, markersize=6, label=gpu)
        # stagger each series' labels vertically so equal GPU counts stay readable
        dy = 10 + 11 * (i - (n_series - 1) / 2)
        for x, y, c in zip(xs, ys, cost):
            ax.annotate(f"{y} · {c:,.0f}", (x, y), textcoords="offset points", xytext=(0, dy), ha="center",
                        fontsize=7, color=line.get_color())
    ax.set_xticks(result.contexts, [_tokens(c) for c in result.contexts])
    ticks = [2**k for k in range(0, max(1, top).bit_length() + 1)]
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.set_ylim(0.5, 2 * ticks[-1])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("GPUs needed (fewest that fit)")
    ax.set_title(f"{result.model}: GPUs needed per context (labels: GPUs · GPU-hours per billion tokens)",
                 fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(title="GPU type", loc="upper left")
    if no_fit:
        fig.text(0.01, 0.005, f"no layout fits within {result.max_gpus} GPUs: {', '.join(no_fit)}", fontsize=7)
    _save(fig, path, fmt)
    return fig


def memory_chart(evaluations: list, labels: list[str], path: str | Path, title: str, fmt: str = "png"):
    """Per-GPU memory of each layout as a stacked bar of its terms (GiB), against the GPU's
    capacity and the usable memory (capacity less the safety margin). Writes the file; returns
    the Figure (for tests)."""
    if not evaluations:
        raise ChartError("no layout to chart")
    fig = _figure(max(6.0, 1.9 * len(evaluations) + 3.5), 6.0)
    ax = fig.add_subplot()
    terms = [t for t in evaluations[0].memory.terms
             if any(ev.memory.terms.get(t, 0) for ev in evaluations)]
    for ev in evaluations[1:]:
        terms += [t for t in ev.memory.terms if t not in terms and ev.memory.terms[t]]
    xs = range(len(evaluations))
    bottoms = [0.0] * len(evaluations)
    for term in terms:
        heights = [ev.memory.terms.get(term, 0) / GIB for ev in evaluations]
        ax.bar(xs, heights, bottom=bottoms, width=0.6, label=term)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for x, ev in zip(xs, evaluations):
        ax.annotate(f"{ev.memory.total_bytes / GIB:,.1f} GiB", (x, ev.memory.total_bytes / GIB),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    mem = evaluations[0].memory
    capacity, usable = mem.capacity_bytes / GIB, mem.usable_bytes / GIB
    ax.axhline(capacity, color="black", linewidth=1.5, label=f"GPU capacity {capacity:,.1f} GiB")
    ax.axhline(usable, color="red", linestyle="--", linewidth=1.5,
               label=f"usable (less safety margin) {usable:,.1f} GiB")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("per-GPU memory (GiB)")
    ax.set_ylim(0, max(capacity, *bottoms) * 1.12)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    _save(fig, path, fmt)
    return fig


def report_chart(report, path: str | Path, fmt: str = "png"):
    """A run's report (ltune.report.RunReport) as two panels: the loss per step, and the
    measured peak memory per rank (or the largest over ranks) beside the plan's predicted
    per-GPU total (GiB). Writes the file; returns the Figure (for tests)."""
    fig = _figure(11.0, 4.5)
    ax_loss, ax_mem = fig.subplots(1, 2)
    steps = [s for s, _ in report.losses]
    ax_loss.plot(steps, [loss for _, loss in report.losses], marker="." if len(steps) < 50 else None,
                 linewidth=1.5, label="loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"{report.model}: loss", fontsize=10)
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend(loc="upper right")
    rows = [row for row in report.memory if row.name != "peak_reserved_bytes"] or list(report.memory)
    predicted = next((row.predicted_bytes for row in report.memory if row.predicted_bytes), None)
    top = 0.0
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        values = list(row.per_rank_bytes) or [row.measured_bytes]
        xs = [r + (i - (len(rows) - 1) / 2) * width for r in range(len(values))]
        heights = [v / GIB for v in values]
        top = max(top, *heights)
        label = row.name.removesuffix("_bytes").replace("_", " ")
        ax_mem.bar(xs, heights, width=width, label=f"measured {label}")
    if predicted:
        top = max(top, predicted / GIB)
        ax_mem.axhline(predicted / GIB, color="red", linestyle="--", linewidth=1.5,
                       label=f"predicted {predicted / GIB:,.2f} GiB")
    ranks = max((len(row.per_rank_bytes) for row in rows), default=0) or 1
    ax_mem.set_xticks(range(ranks), [str(r) for r in range(ranks)] if ranks > 1 or rows and rows[0].per_rank_bytes
                      else ["max over ranks"])
    ax_mem.set_xlabel("rank")
    ax_mem.set_ylabel("peak memory (GiB)")
    ax_mem.set_ylim(0, max(top, 1e-3) * 1.15)
    ax_mem.set_title("peak memory: measured vs predicted", fontsize=10)
    ax_mem.legend(loc="lower right", fontsize=8)
    _save(fig, path, fmt)
    return fig
