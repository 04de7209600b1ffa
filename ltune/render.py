"""Rich renderables and JSON shapes for the command line. Builds; never prints."""

from __future__ import annotations

from rich.table import Table

from .profiles import GIB


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:,.2f}"


def layout_line(lay) -> str:
    return (
        f"{lay.num_gpus} GPU{'s' if lay.num_gpus > 1 else ''}, ZeRO-{lay.zero_stage}, sp {lay.sp_degree}, "
        f"micro-batch {lay.micro_batch_size}, offload {lay.offload}, recompute {lay.recompute}, "
        f"loss {lay.loss}, attention {lay.attention}"
    )


def term_label(name: str, recompute: str | None) -> str:
    """A memory term as the tables name it. With --recompute none the planner's
    `activations_checkpoints` holds every tensor each layer saves for backward, not layer-input
    checkpoints: shown as `activations_saved` (the JSON and the plan keep the planner's name)."""
    if name == "activations_checkpoints" and recompute == "none":
        return "activations_saved"
    return name


def host_memory_line(mem) -> str:
    """Host memory per node (offloaded states, pinned buffers) against the node's capacity."""
    share = 100 * mem.host_bytes_per_node / mem.host_capacity_bytes_per_node if mem.host_capacity_bytes_per_node else 0
    verdict = "fits" if mem.fits_host else "does not fit"
    return (f"host memory per node {gib(mem.host_bytes_per_node)} of {gib(mem.host_capacity_bytes_per_node)} GiB "
            f"({share:.0f}%, {verdict}; --host-mem-gib sets the capacity)")


def trace_pct(analytic_bytes: int, traced_bytes: int) -> str:
    """analytic - traced in % of traced; a dash when both show as 0.00 GiB, words when one side is zero."""
    if round(analytic_bytes / GIB, 2) == 0 and round(traced_bytes / GIB, 2) == 0:
        return "—"
    if not analytic_bytes:
        return "none predicted"
    if not traced_bytes:
        return "none traced"
    return f"{100 * (analytic_bytes - traced_bytes) / traced_bytes:+.1f}"


def speed_line(ev) -> str:
    th = ev.throughput
    return (
        f"step {th.step_time_s:.2f} s, {th.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, MFU {100 * th.mfu:.1f}%"
        f" (exposed communication {th.exposed_comm_s:.2f} s)"
    )


def params_phrase(model) -> str:
    """'6.74B params'; a mixture-of-experts model adds its active share and routing:
    '46.70B params, 12.88B active (top-2 of 8 experts)'."""
    total = f"{model.num_params() / 1e9:.2f}B params"
    if not model.is_moe:
        return total
    shared = f", {model.num_shared_experts} shared" if model.num_shared_experts else ""
    return (f"{total}, {model.active_params() / 1e9:.2f}B active "
            f"(top-{model.num_experts_per_tok} of {model.num_experts} experts{shared})")


def communication_bound(th) -> bool:
    """Exposed communication (what compute does not hide) longer than the compute of the step."""
    return th.exposed_comm_s > th.compute_s


def communication_bound_line(ev, model, gpu) -> str | None:
    """For a communication-bound layout: the exposed communication against compute, and what the
    traffic is (ZeRO moves every parameter, every expert of a MoE model; compute uses the active
    ones); None otherwise."""
    th, lay = ev.throughput, ev.layout
    if not communication_bound(th):
        return None
    where = "inside one node (NVLink)" if lay.num_gpus <= gpu.gpus_per_node else "across nodes (the nodes' NICs)"
    moves = ("gathers all parameters in forward and backward and reduce-scatters all gradients"
             if lay.zero_stage == 3 else "reduces all gradients and gathers the updated parameters")
    experts = (f", every expert of each layer, while compute uses the {model.active_params() / 1e9:.2f}B active"
               if model.is_moe else "")
    extra = [what for what, on in (("offload over the host link", lay.offload != "none"),
                                    (f"Ulysses all-to-alls over sp {lay.sp_degree}", lay.sp_degree > 1)) if on]
    return (f"communication-bound: exposed communication {th.exposed_comm_s:.2f} s > compute {th.compute_s:.2f} s "
            f"per step; ZeRO-{lay.zero_stage} {moves} on {lay.num_gpus} GPUs {where} "
            f"({model.num_params() / 1e9:.2f}B params{experts})"
            + (f"; plus {' and '.join(extra)}" if extra else ""))


def batch_line(ev, seq_len: int) -> str:
    """The global batch and how the layout reaches it."""
    lay = ev.layout
    return (
        f"global batch {ev.global_batch:,} sequences ({ev.global_batch * seq_len:,} tokens) per optimizer step = "
        f"micro-batch {lay.micro_batch_size} x accumulation {ev.gradient_accumulation_steps} x data-parallel "
        f"{lay.dp_degree}"
    )


def cost_line(ev) -> str:
    """Tokens/s over all GPUs and GPU-hours per million tokens."""
    th = ev.throughput
    n = ev.layout.num_gpus
    return (f"{th.tokens_per_s_per_gpu * n:,.0f} tokens/s on {n} GPU{'s' if n > 1 else ''}, "
            f"{ev.gpu_hours_per_million_tokens:.3f} GPU-hours per million tokens")


def short_layout(lay) -> str:
    """The fields that vary most, for one table cell."""
    return (f"ZeRO-{lay.zero_stage}, sp {lay.sp_degree}, mb {lay.micro_batch_size}, offload {lay.offload}, "
            f"recompute {lay.recompute}, loss {lay.loss}")


def per_count_table(result) -> Table:
    """Every GPU count tried: the fastest layout that fits there, or how far the closest misses."""
    table = Table(title=f"by GPU count (global batch {result.global_batch:,} sequences, the same for each)")
    for col in ("GPUs", "fits", "best layout there", "accum", "tokens/s/GPU", "step s", "GPU-h/Mtok"):
        table.add_column(col, justify="left" if col in ("fits", "best layout there") else "right")
    for pc in result.per_count:
        if pc.best is not None:
            ev, th = pc.best, pc.best.throughput
            table.add_row(str(pc.num_gpus), "yes", short_layout(ev.layout), str(ev.gradient_accumulation_steps),
                          f"{th.tokens_per_s_per_gpu:,.0f}", f"{th.step_time_s:,.1f}",
                          f"{ev.gpu_hours_per_million_tokens:.3f}")
        elif pc.shortfall is not None:
            sf = pc.shortfall
            table.add_row(str(pc.num_gpus), "no", f"closest: {short_layout(sf.layout)}; {describe_shortfall(sf)}",
                          "", "", "", "")
        else:
            table.add_row(str(pc.num_gpus), "no", pc.note or "", "", "", "", "")
    return table


def breakdown_table(ev, title: str, limits: bool = False) -> Table:
    """Per-GPU memory by term (GiB and % of the GPU); `limits` adds usable and host rows."""
    mem = ev.memory
    table = Table(title=title, show_footer=True)
    table.add_column("term", footer=f"total (peak: {mem.peak_phase})")
    table.add_column("GiB", justify="right", footer=gib(mem.total_bytes))
    table.add_column("% of GPU", justify="right", footer=f"{100 * mem.total_bytes / mem.capacity_bytes:.1f}")
    for name, size in mem.terms.items():
        if size:
            table.add_row(term_label(name, ev.layout.recompute), gib(size), f"{100 * size / mem.capacity_bytes:.1f}")
    if limits:
        table.add_section()
        table.add_row("usable (capacity less margin)", gib(mem.usable_bytes), f"{100 * mem.usable_bytes / mem.capacity_bytes:.1f}")
        if mem.host_bytes_per_node:
            table.add_row("host memory per node", gib(mem.host_bytes_per_node), "")
            table.add_row("host capacity per node", gib(mem.host_capacity_bytes_per_node), "")
    return table


def runners_up_table(evaluations) -> Table:
    table = Table(title="runners-up")
    for col in ("layout", "GiB", "tokens/s/GPU"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    for ev in evaluations:
        table.add_row(layout_line(ev.layout), gib(ev.memory.total_bytes), f"{ev.throughput.tokens_per_s_per_gpu:,.0f}")
    return table


def method_line(model, method, precision: str) -> str:
    """What trains: the method, its trainable parameters and, for QLoRA, the 4-bit weights' bytes."""
    from .planner import lora

    total = model.num_params()
    if not method.adapters:
        return f"method: full fine-tuning, every parameter trains ({total:,})"
    targets = lora.target_modules(model, method)
    if method.lora_targets is not None:
        which = "of its linear layers"
    else:  # a MoE model's experts are 3-D tensors, not linear layers
        which = "every attention linear layer; the experts take none" if model.is_moe else "every linear layer"
    trainable = lora.trainable_params(model, method)
    name = "LoRA" if method.kind == "lora" else "QLoRA"
    line = (f"method: {name} rank {method.lora_rank}, alpha {method.lora_alpha:g}"
            f"{f', dropout {method.lora_dropout:g}' if method.lora_dropout else ''} on {', '.join(targets)} ({which}): "
            f"{trainable:,} trainable parameters ({100 * trainable / total:.2f}% of {total / 1e9:.2f}B)")
    if method.kind == "lora":
        return f"{line}; base weights frozen in {precision}"
    scheme = f"{method.quant_type}{', double quant' if method.double_quant else ''}"
    return (f"{line}; base linear weights frozen in 4 bits ({scheme}): {gib(lora.quantized_bytes(model, method))} GiB "
            f"for {lora.quantized_params(model, method) / 1e9:.2f}B weights; embedding, norms, "
            f"{'experts, ' if model.is_moe else ''}output head in {precision}")


def method_json(model, method) -> dict:
    """The method's fields of the JSON outputs: kind, all, active (those one token uses: all of them
    but a MoE model's unrouted experts) and trainable parameters, the 4-bit bytes (qlora)."""
    from .planner import lora

    return {"method": method.kind, "params": model.num_params(), "active_params": model.active_params(),
            "trainable_params": lora.trainable_params(model, method),
            "quantized_bytes": lora.quantized_bytes(model, method)}


def evaluation_json(ev, method: dict | None = None) -> dict:
    """One evaluated layout; `method` (method_json) adds what trains."""
    return {
        **(method or {}),
        "fits": ev.fits,
        "layout": ev.layout.model_dump(),
        "global_batch": ev.global_batch,
        "micro_batch_size": ev.layout.micro_batch_size,
        "gradient_accumulation_steps": ev.gradient_accumulation_steps,
        "dp_degree": ev.layout.dp_degree,
        "gpu_hours_per_million_tokens": ev.gpu_hours_per_million_tokens,
        "memory": ev.memory.model_dump(),
        "throughput": ev.throughput.model_dump(),
        "communication_bound": communication_bound(ev.throughput),
    }


def trace_table(result, analytic, recompute: str | None = None) -> Table:
    """Analytic vs traced memory per term, with the difference (`recompute`: the layout's, for term_label)."""
    from .trace import UNTRACED_TERMS, comparable_totals, compare

    table = Table(title="per-GPU memory: analytic vs traced (GiB)", show_footer=True)
    a_total, t_total = comparable_totals(result, analytic.terms)
    diff_pct = 100 * (a_total - t_total) / t_total if t_total else 0.0
    table.add_column("term", footer="total of traced terms")
    table.add_column("analytic", justify="right", footer=gib(a_total))
    table.add_column("traced", justify="right", footer=gib(t_total))
    table.add_column("analytic - traced", justify="right", footer=f"{(a_total - t_total) / GIB:+,.3f}")
    table.add_column("%", justify="right", footer=f"{diff_pct:+.2f}")
    for row in compare(result, analytic.terms):
        a, t = row["analytic_bytes"], row["traced_bytes"]
        if not a and (t or 0) < 2**20:
            continue  # below 1 MiB on both sides (inputs, buffers)
        label = term_label(row["term"], recompute)
        if t is None:
            table.add_row(label, gib(a), "[dim]not traced[/]", "", "")
            continue
        table.add_row(label, gib(a), gib(t), f"{(a - t) / GIB:+,.3f}", trace_pct(a, t))
    table.caption = (
        f"peak: analytic at '{analytic.peak_phase}', traced at '{result.peak_phase}'; "
        f"not traced: {', '.join(UNTRACED_TERMS)}"
    )
    return table


def describe_shortfall(sf) -> str:
    """One line: how far a GPU count falls short and the biggest term."""
    host = f"host memory over by {sf.host_over_bytes / GIB:.1f} GiB per node"
    if sf.over_bytes <= 0:
        return host
    term = term_label(sf.largest_term, sf.layout.recompute)
    gpu = f"over by {sf.over_bytes / GIB:.1f} GiB; largest term {term} {sf.largest_term_bytes / GIB:.1f} GiB"
    return f"{gpu}; {host}" if sf.host_over_bytes > 0 else gpu


def checkpoint_line(ckpt) -> str:
    """One line: a checkpoint's size, its save time, and how often the job saves."""
    every = f"every {ckpt.every_steps} steps" if ckpt.every_steps else "only at the end"
    return (
        f"checkpoint {ckpt.total_bytes / 1e9:,.1f} GB ({ckpt.max_node_bytes / 1e9:,.1f} GB from the busiest node), "
        f"~{ckpt.save_time_s:,.0f} s to save at {ckpt.storage_write_bytes_per_s / 1e9:g} GB/s per node; {every}; "
        f"a stop needs {ckpt.stop_grace_s} s"
    )


def plan_json(req, result, model_name: str, longest=None) -> dict:
    """`ltune plan --json`: the chosen (or closest) layout and the rest of the search."""
    closest = result.closest
    chosen = result.best or (closest.evaluation if closest else None)
    method = method_json(req.model, req.method)
    out = evaluation_json(chosen, method) if chosen else {"fits": False, **method}
    out.update(
        model=model_name, gpu=req.gpu.name, seq_len=req.seq_len, precision=req.precision,
        safety_margin=req.safety_margin, prefer=result.prefer,
        method_config=req.method.model_dump(mode="json"),
        global_batch=result.global_batch, tokens_per_step=result.tokens_per_step,
        runners_up=[evaluation_json(ev, method) for ev in result.runners_up],
        no_offload=evaluation_json(result.no_offload, method) if result.no_offload else None,
        per_count=[
            {"num_gpus": pc.num_gpus, "fits": pc.fits, "layouts": pc.layouts, "note": pc.note,
             "best": evaluation_json(pc.best, method) if pc.best else None,
             "shortfall": pc.shortfall.model_dump() if pc.shortfall else None}
            for pc in result.per_count
        ],
        shortfalls=[sf.model_dump() for sf in result.shortfalls],
        conventional=evaluation_json(result.conventional, method) if result.conventional else None,
        layouts_evaluated=result.evaluated,
    )
    if longest is not None:
        out["longest_context"] = longest.as_json()
    if chosen is not None:
        from .planner.build import checkpoint_for

        out["checkpoint"] = checkpoint_for(req, chosen).model_dump()
    if closest is not None:
        out["remedies"] = [r.text for r in closest.remedies]
        out["remedy_details"] = [r.as_json() for r in closest.remedies]
    return out


def trace_json(name, gpu_profile, seq_len, prec, layout, analytic, result) -> dict:
    """`ltune trace --json`: analytic and traced terms side by side."""
    from .trace import comparable_totals, compare

    a_total, t_total = comparable_totals(result, analytic.terms)
    return {
        "model": name, "gpu": gpu_profile.name, "seq_len": seq_len, "precision": prec,
        "layout": layout.model_dump(),
        "analytic": {"terms": analytic.terms, "total_bytes": analytic.total_bytes, "peak_phase": analytic.peak_phase},
        "traced": result.model_dump(mode="json"),
        "comparison": compare(result, analytic.terms),
        "comparable": {"analytic_bytes": a_total, "traced_bytes": t_total,
                       "error_pct": 100 * (a_total - t_total) / t_total if t_total else 0.0},
    }


def _ctx_label(n: int) -> str:
    """4096 -> 4k, 1048576 -> 1M (exact multiples only), else the number."""
    if n % 2**20 == 0:
        return f"{n // 2**20}M"
    return f"{n // 2**10}k" if n % 2**10 == 0 else f"{n:,}"


def sweep_matrix_table(result) -> Table:
    """GPUs needed: one row per context, one column per GPU type."""
    table = Table(title=f"{result.model}: fewest GPUs that fit (tokens/s/GPU)")
    table.add_column("context", justify="right")
    for gpu in result.gpus:
        table.add_column(gpu, justify="right")
    for ctx in result.contexts:
        row = [f"{_ctx_label(ctx)} ({ctx:,})"]
        for gpu in result.gpus:
            c = result.cell(gpu, ctx)
            row.append(f"{c.num_gpus} ({c.tokens_per_s_per_gpu:,.0f})" if c.fits else f"[red]> {result.max_gpus}[/]")
        table.add_row(*row)
    return table


def sweep_table(result) -> Table:
    """Every cell of the sweep: GPU count, layout, tokens/s/GPU and GPU-hours per billion tokens."""
    table = Table(title="per cell: the fastest layout at the fewest GPUs that fit")
    for col in ("GPU", "ctx", "GPUs", "layout", "tok/s/GPU", "MFU%", "GPU-h/Btok"):
        table.add_column(col, justify="left" if col in ("GPU", "layout") else "right", ratio=1 if col == "layout" else None)
    for i, gpu in enumerate(result.gpus):
        if i:
            table.add_section()
        for c in result.series(gpu):
            if c.fits:
                lay = c.best.layout
                layout = (f"ZeRO-{lay.zero_stage} sp {lay.sp_degree} mb {lay.micro_batch_size}; offload {lay.offload}; "
                          f"recompute {lay.recompute}; loss {lay.loss}")
                table.add_row(gpu, _ctx_label(c.seq_len), str(c.num_gpus), layout, f"{c.tokens_per_s_per_gpu:,.0f}",
                              f"{100 * c.best.throughput.mfu:.1f}", f"{c.gpu_hours_per_billion_tokens:,.1f}")
            else:
                why = f"; closest {describe_shortfall(c.closest)}" if c.closest is not None else ""
                table.add_row(gpu, _ctx_label(c.seq_len), f"> {result.max_gpus}", f"[red]no layout fits[/]{why}",
                              "", "", "")
    return table


def sweep_json(result) -> dict:
    """`ltune sweep --json`: one object per cell, GPU types in order, contexts ascending."""
    cells = []
    for c in result.cells:
        ev = c.best
        cells.append({
            "gpu": c.gpu, "seq_len": c.seq_len, "fits": c.fits, "num_gpus": c.num_gpus,
            "method": result.method.kind, "trainable_params": result.trainable_params,
            "layout": ev.layout.model_dump() if ev else None,
            "global_batch": c.global_batch,
            "gradient_accumulation_steps": ev.gradient_accumulation_steps if ev else None,
            "tokens_per_s_per_gpu": c.tokens_per_s_per_gpu,
            "gpu_hours_per_billion_tokens": c.gpu_hours_per_billion_tokens,
            "mfu": ev.throughput.mfu if ev else None,
            "step_time_s": ev.throughput.step_time_s if ev else None,
            "memory_total_bytes": ev.memory.total_bytes if ev else None,
            "usable_bytes": ev.memory.usable_bytes if ev else None,
            "closest": c.closest.model_dump() if c.closest is not None else None,
            "layouts_evaluated": c.evaluated,
        })
    return {"model": result.model, "gpus": list(result.gpus), "contexts": list(result.contexts),
            "max_gpus": result.max_gpus, "prefer": "fewest", "method": result.method.kind,
            "method_config": result.method.model_dump(mode="json"), "params": result.params,
            "trainable_params": result.trainable_params, "seconds": result.seconds, "cells": cells}


def chart_label(lay) -> str:
    """A layout in three short lines, for a chart's axis."""
    return (f"{lay.num_gpus} GPU{'s' if lay.num_gpus > 1 else ''}, ZeRO-{lay.zero_stage}, sp {lay.sp_degree}\n"
            f"mb {lay.micro_batch_size}, offload {lay.offload}\nrecompute {lay.recompute}, loss {lay.loss}")
