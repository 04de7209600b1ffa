"""ltune's command line: the only module that prints.

Commands: plan, check, models, gpus, schema, launch, trace.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .planner.fit import check_fit
from .planner.io import PlanError, dump_plan, load_plan
from .planner.schema import check_sp_degree
from .profiles import GIB, ProfileError, gpu_names, load_gpu, load_model, model_names, resolve_model

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Plan, check and launch long-context LLM fine-tuning jobs.",
)
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)


def fail(message: str, code: int = 2) -> typer.Exit:
    """A one-line error for a user mistake, then the exit code."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:,.2f}"


# ---------------------------------------------------------------- models, gpus


@app.command()
def models() -> None:
    """List the model profiles (--model also takes a config.json path or a size like 7b)."""
    table = Table(title="model profiles")
    for col in ("name", "params", "layers", "hidden", "heads/kv", "ffn", "vocab", "tied"):
        table.add_column(col, justify="right" if col != "name" else "left")
    for name in model_names():
        m = load_model(name)
        table.add_row(
            name,
            f"{m.num_params() / 1e9:.2f}B",
            str(m.num_layers),
            str(m.hidden_size),
            f"{m.num_attention_heads}/{m.num_kv_heads}",
            str(m.intermediate_size),
            str(m.vocab_size),
            "yes" if m.tie_word_embeddings else "no",
        )
    console.print(table)


@app.command()
def gpus() -> None:
    """List the GPU profiles (memory as the CUDA runtime reports it)."""
    table = Table(title="GPU profiles")
    for col in ("name", "device", "memory GiB", "bf16 TFLOPS", "fp16 TFLOPS", "HBM TB/s", "per node"):
        table.add_column(col, justify="left" if col in ("name", "device") else "right")
    for name in gpu_names():
        g = load_gpu(name)
        table.add_row(
            name,
            g.display_name,
            gib(g.hbm_bytes),
            f"{g.bf16_tflops:g}" if g.supports_bf16 else "-",
            f"{g.fp16_tflops:g}",
            f"{g.hbm_bandwidth_bytes_per_s / 1e12:.2f}",
            str(g.gpus_per_node),
        )
    console.print(table)


@app.command()
def schema() -> None:
    """Print the JSON Schema of plan.yaml."""
    from .planner.schema import Plan

    print(json.dumps(Plan.model_json_schema(), indent=2))


# ---------------------------------------------------------------- plan, check
# (the lead's section: plan and check commands go here)


# ---- launch (launcher helper) ----


def _launch_breakdown_table(evaluation) -> Table:
    """The fit re-check's memory breakdown, GiB per GPU."""
    mem = evaluation.memory
    table = Table(title="memory per GPU (fit re-check)")
    table.add_column("term")
    table.add_column("GiB", justify="right")
    for name, n_bytes in mem.terms.items():
        table.add_row(name, gib(n_bytes))
    table.add_row("[bold]total[/]", f"[bold]{gib(mem.total_bytes)}[/]")
    table.add_row("usable", gib(mem.usable_bytes))
    table.add_row("capacity", gib(mem.capacity_bytes))
    if mem.host_capacity_bytes_per_node:
        table.add_row("host per node", gib(mem.host_bytes_per_node))
        table.add_row("host capacity per node", gib(mem.host_capacity_bytes_per_node))
    return table


@app.command()
def launch(
    plan_file: Path = typer.Argument(..., metavar="PLAN", help="plan.yaml written by `ltune plan`."),
    launcher: str = typer.Option(
        "deepspeed", "--launcher", help="deepspeed (DeepSpeed's runner), torchrun, or slurm (writes an sbatch script)."
    ),
    hostfile: Optional[Path] = typer.Option(
        None, "--hostfile", help="deepspeed: MPI-style hostfile ('host slots=N' per line) for several nodes."
    ),
    nnodes: Optional[int] = typer.Option(
        None, "--nnodes", help="Nodes (default: the plan's, or as many as its GPU profile needs)."
    ),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", help="This node's rank when each node is started by hand."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Address of node 0 (several nodes)."),
    master_port: Optional[int] = typer.Option(
        None, "--master-port", help="Rendezvous port (default 29500; a free port for the cpu target)."
    ),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run folder (default: the plan's training.output_dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the run folder from its latest checkpoint."),
    force: bool = typer.Option(False, "--force", help="Launch even if the fit re-check says the plan does not fit."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the command and the DeepSpeed config; write and start nothing."),
    submit: bool = typer.Option(False, "--submit", help="slurm: also submit the script with sbatch."),
) -> None:
    """Launch a plan: re-check its fit, write the run folder, start the job.

    The run folder gets plan.yaml (paths made absolute), ds_config.json and command.json.

    Every process runs `python -m ltune.trainer RUN_DIR`, started by DeepSpeed's launcher or torchrun.

    Output is streamed and ltune exits with the job's exit code.

    A plan that no longer fits is refused (exit 1) unless --force.

    A bad plan, data, hostfile or port is a one-line error (exit 2); nothing is written.
    """
    import shlex
    import shutil

    from .launcher import FitRefused, LaunchError, LaunchOptions, plan_launch, start, write_spec
    from .planner.io import PlanError, load_plan

    try:
        plan = load_plan(plan_file)
        options = LaunchOptions(
            launcher=launcher,
            hostfile=str(hostfile) if hostfile else None,
            nnodes=nnodes,
            node_rank=node_rank,
            master_addr=master_addr,
            master_port=master_port,
            run_dir=str(run_dir) if run_dir else None,
            resume=resume,
            force=force,
            dry_run=dry_run,
        )
        spec = plan_launch(plan, plan_file, options)
    except FitRefused as e:
        console.print(_launch_breakdown_table(e.evaluation))
        raise fail(f"{e} (--force launches it anyway)", e.exit_code)
    except (PlanError, LaunchError) as e:
        raise fail(str(e), getattr(e, "exit_code", 2))

    if spec.evaluation is None:
        err_console.print("[yellow]warning:[/] fit re-check unavailable; launching unchecked")
    elif not spec.forced:
        mem = spec.evaluation.memory
        console.print(
            f"[bold]fit[/] {gib(mem.total_bytes)} of {gib(mem.usable_bytes)} GiB usable per GPU "
            f"({plan.hardware.gpu}, {spec.nodes.nnodes} x {spec.nodes.nproc_per_node})",
            highlight=False,
        )
    elif spec.forced:
        console.print(_launch_breakdown_table(spec.evaluation))
        from .launcher import shortfall_message

        err_console.print(f"[yellow]warning:[/] {shortfall_message(plan, spec.evaluation)}; launching anyway (--force)")

    command_line = " ".join(shlex.quote(a) for a in spec.argv)
    env_line = " ".join(f"{k}={shlex.quote(v)}" for k, v in spec.env.items())
    if dry_run:
        console.print(f"[bold]run folder[/] {spec.run_dir} (not written: --dry-run)", highlight=False)
        console.print(f"[bold]env[/] {env_line}", highlight=False, soft_wrap=True)
        console.print(f"[bold]command[/] {command_line}", highlight=False, soft_wrap=True)
        if spec.sbatch is not None:
            console.print("[bold]sbatch script[/]")
            print(spec.sbatch, end="")
        console.print("[bold]ds_config.json[/]")
        print(json.dumps(spec.ds_config, indent=2))
        return

    if spec.launcher == "slurm" and submit and shutil.which("sbatch") is None:
        raise fail("--submit: sbatch not found on PATH (write the script without --submit)")
    try:
        write_spec(spec)
    except OSError as e:
        raise fail(f"cannot write run folder {spec.run_dir}: {e.strerror}")
    console.print(f"[bold]run folder[/] {spec.run_dir}", highlight=False)
    if spec.launcher == "slurm" and not submit:
        console.print(f"submit with: {command_line}", highlight=False, soft_wrap=True)
        return
    console.print(f"[bold]starting[/] {env_line} {command_line}", highlight=False, soft_wrap=True)
    try:
        code = start(spec)
    except LaunchError as e:
        raise fail(str(e), e.exit_code)
    if code:
        err_console.print(f"[bold red]job exited with code {code}[/] (run folder {spec.run_dir})", highlight=False)
    raise typer.Exit(code)


# ---- end launch ----

_LAYOUT_HELP = "Pin one dimension of the layout; unpinned ones are searched."


def _render_breakdown(ev, title: str) -> Table:
    mem = ev.memory
    table = Table(title=title, show_footer=True)
    table.add_column("term", footer="total (peak: " + mem.peak_phase + ")")
    table.add_column("GiB", justify="right", footer=gib(mem.total_bytes))
    table.add_column("% of GPU", justify="right", footer=f"{100 * mem.total_bytes / mem.capacity_bytes:.1f}")
    for name, size in mem.terms.items():
        if size:
            table.add_row(name, gib(size), f"{100 * size / mem.capacity_bytes:.1f}")
    return table


def _layout_line(lay) -> str:
    return (
        f"{lay.num_gpus} GPU{'s' if lay.num_gpus > 1 else ''}, ZeRO-{lay.zero_stage}, sp {lay.sp_degree}, "
        f"micro-batch {lay.micro_batch_size}, offload {lay.offload}, recompute {lay.recompute}, "
        f"loss {lay.loss}, attention {lay.attention}"
    )


def _speed_line(ev) -> str:
    th = ev.throughput
    return (
        f"step {th.step_time_s:.2f} s, {th.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, MFU {100 * th.mfu:.1f}%"
        f" (exposed communication {th.exposed_comm_s:.2f} s)"
    )


def _evaluation_json(ev) -> dict:
    return {
        "fits": ev.fits,
        "layout": ev.layout.model_dump(),
        "memory": ev.memory.model_dump(),
        "throughput": ev.throughput.model_dump(),
    }


def _print_plan(req, result, model_name: str) -> None:
    from .planner.search import describe_shortfall

    m, g = req.model, req.gpu
    generic = " [yellow](generic llama-shaped estimate)[/]" if m.generic else ""
    console.print(
        f"[bold]{model_name}[/] ({m.num_params() / 1e9:.2f}B params, {m.num_layers} layers, hidden "
        f"{m.hidden_size}){generic} at {req.seq_len:,} tokens on {g.display_name} "
        f"({gib(g.hbm_bytes)} GiB; plans keep a {100 * req.safety_margin:.0f}% safety margin)"
    )
    best = result.best
    if best is not None:
        console.print(f"\n[bold green]recommended:[/] {_layout_line(best.layout)}")
        console.print(f"  {_speed_line(best)}")
        console.print(_render_breakdown(best, "per-GPU memory"))
    if result.runners_up:
        table = Table(title="runners-up")
        for col in ("layout", "GiB", "tokens/s/GPU"):
            table.add_column(col, justify="left" if col == "layout" else "right")
        for ev in result.runners_up:
            table.add_row(_layout_line(ev.layout), gib(ev.memory.total_bytes), f"{ev.throughput.tokens_per_s_per_gpu:,.0f}")
        console.print(table)
    for sf in result.shortfalls:
        console.print(f"  {sf.num_gpus} GPU(s) do not fit: {describe_shortfall(sf)} ({_layout_line(sf.layout)})")
    conv = result.conventional
    if conv is not None and (best is None or conv.layout != best.layout):
        console.print(
            f"\n[bold]constrained (ZeRO-3, no sp, no offload, full recompute, full loss, micro-batch 1):[/] "
            f"{conv.layout.num_gpus} GPUs, {gib(conv.memory.total_bytes)} GiB, {_speed_line(conv)}"
        )
    console.print(f"[dim]{result.evaluated:,} layouts evaluated in {result.seconds * 1000:.0f} ms[/]")


@app.command()
def plan(
    model: str = typer.Option(..., "--model", "-m", help="Profile name (ltune models), a HF config.json or its folder, or a size like 7b."),
    ctx: int = typer.Option(..., "--ctx", help="Context length: tokens per packed sequence.", min=1),
    gpu: str = typer.Option("a100-80g", "--gpu", help="GPU profile (ltune gpus)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="Fix the GPU count (default: search powers of two).", min=1),
    max_gpus: int = typer.Option(1024, "--max-gpus", help="Largest GPU count searched.", min=1),
    zero_stage: Optional[int] = typer.Option(None, "--zero-stage", help=_LAYOUT_HELP, min=0, max=3),
    sp_degree: Optional[int] = typer.Option(None, "--sp-degree", help="Ulysses sequence-parallel degree. " + _LAYOUT_HELP, min=1),
    offload: Optional[str] = typer.Option(None, "--offload", help="none|optimizer|all. Unpinned, offload is tried only when nothing else fits."),
    loss: Optional[str] = typer.Option(None, "--loss", help="full|chunked (chunked never holds all fp32 logits)."),
    recompute: Optional[str] = typer.Option(None, "--recompute", help="full|none (gradient checkpointing)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Packed sequences per GPU per step.", min=1),
    attention: str = typer.Option("varlen", "--attention", help="varlen (flash, linear memory) or eager (quadratic)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="bf16|fp16 (default bf16, fp16 where the GPU has no bf16)."),
    host_mem_gib: Optional[float] = typer.Option(None, "--host-mem-gib", help="Host memory per node for offload (default: the GPU profile's)."),
    safety_margin: float = typer.Option(0.05, "--safety-margin", help="Fraction of GPU memory kept free.", min=0.0, max=0.5),
    chunk_tokens: int = typer.Option(4096, "--loss-chunk-tokens", help="Tokens per chunk of the chunked loss.", min=1),
    steps: int = typer.Option(1000, "--steps", help="Training steps written to plan.yaml.", min=1),
    lr: float = typer.Option(2e-5, "--lr", help="Learning rate written to plan.yaml."),
    data: list[str] = typer.Option([], "--data", help="JSONL file or folder (repeatable), written to plan.yaml."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the recommended plan to this plan.yaml."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Find the fastest layout that fits, at the smallest GPU count, and show why.

    Exit 0 when a layout fits, 1 when none does, 2 for bad input.
    """
    from .planner.build import build_plan
    from .planner.search import Pins, Request, remedies, search

    choices = {"offload": (offload, ("none", "optimizer", "all")), "loss": (loss, ("full", "chunked")),
               "recompute": (recompute, ("full", "none")), "attention": (attention, ("varlen", "eager")),
               "precision": (precision, ("bf16", "fp16"))}
    for key, (value, allowed) in choices.items():
        if value is not None and value not in allowed:
            raise fail(f"--{key} must be one of {', '.join(allowed)} (got '{value}')")
    try:
        arch = resolve_model(model)
        gpu_profile = load_gpu(gpu)
    except ProfileError as e:
        raise fail(str(e))
    if precision is None:
        precision = "bf16" if gpu_profile.supports_bf16 else "fp16"
    elif precision == "bf16" and not gpu_profile.supports_bf16:
        raise fail(f"{gpu_profile.name} has no bf16; use --precision fp16")
    try:
        pins = Pins(num_gpus=gpus, zero_stage=zero_stage, sp_degree=sp_degree, micro_batch_size=micro_batch,
                    offload=offload, recompute=recompute, loss=loss, attention=attention, max_gpus=max_gpus)
        if sp_degree is not None:
            check_sp_degree(sp_degree, arch)
            if gpus is not None and gpus % sp_degree:
                raise ValueError(f"sp_degree ({sp_degree}) must divide --gpus ({gpus})")
        req = Request(model=arch, gpu=gpu_profile, seq_len=ctx, precision=precision, chunk_tokens=chunk_tokens,
                      safety_margin=safety_margin,
                      host_mem_bytes=int(host_mem_gib * GIB) if host_mem_gib else None, pins=pins)
    except ValueError as e:
        raise fail(str(e).splitlines()[-1] if "validation error" in str(e) else str(e))
    result = search(req)
    best = result.best
    closest = result.shortfalls[0] if best is None and result.shortfalls else None
    if as_json:
        chosen = best if best is not None else (_evaluate(req, closest.layout) if closest else None)
        out = _evaluation_json(chosen) if chosen else {"fits": False}
        out.update(
            model=model, gpu=gpu_profile.name, seq_len=ctx, precision=precision, safety_margin=safety_margin,
            runners_up=[_evaluation_json(ev) for ev in result.runners_up],
            shortfalls=[sf.model_dump() for sf in result.shortfalls],
            conventional=_evaluation_json(result.conventional) if result.conventional else None,
            layouts_evaluated=result.evaluated,
        )
        if closest is not None:
            out["remedies"] = remedies(req, closest)
        print(json.dumps(out, indent=2))
    else:
        _print_plan(req, result, model)
    if best is None:
        if closest is not None and not as_json:
            err_console.print(f"[bold red]no layout fits;[/] closest: {_layout_line(closest.layout)}, "
                              f"{describe_shortfall_text(closest)}")
            for hint in remedies(req, closest):
                err_console.print(f"  - {hint}")
        raise typer.Exit(1)
    if output is not None:
        try:
            plan_obj = build_plan(req, best, model, {"max_steps": steps, "learning_rate": lr, "data": data}, host_mem_gib)
        except ValueError as e:
            raise fail(str(e))
        dump_plan(plan_obj, output)
        if not as_json:
            console.print(f"wrote {output}")


def _evaluate(req, layout):
    from .planner.search import evaluate

    return evaluate(req, layout)


def describe_shortfall_text(sf) -> str:
    from .planner.search import describe_shortfall

    return describe_shortfall(sf)


@app.command()
def check(
    plans: list[Path] = typer.Argument(..., help="plan.yaml files (globs expanded by your shell)."),
) -> None:
    """For CI: re-check that each plan still fits its target GPUs. Exit 1 if any does not."""
    failed = 0
    for path in plans:
        try:
            plan_obj = load_plan(path)
            ev = check_fit(plan_obj)
        except (PlanError, ProfileError) as e:
            raise fail(str(e))
        mem = ev.memory
        status = "[green]fits[/]" if ev.fits else "[bold red]does not fit[/]"
        console.print(
            f"{path}: {status}: {gib(mem.total_bytes)} of {gib(mem.usable_bytes)} GiB usable "
            f"({_layout_line(ev.layout)})"
        )
        if not ev.fits:
            failed += 1
            if not mem.fits_gpu:
                console.print(_render_breakdown(ev, f"{path}: per-GPU memory"))
            if not mem.fits_host:
                console.print(f"  host memory {gib(mem.host_bytes_per_node)} GiB per node > {gib(mem.host_capacity_bytes_per_node)} GiB")
    if failed:
        raise typer.Exit(1)


# ---- trace (trace helper) ----


def _trace_layout_from_options(model, ctx, gpu, gpus, zero_stage, sp_degree, offload, loss, recompute,
                               micro_batch, attention, precision, chunk_tokens):
    """(arch, gpu profile, layout, precision): the layout `ltune plan` would pick with these pins."""
    from .planner.search import Pins, Request, search

    if model is None or ctx is None:
        raise ValueError("give --model and --ctx, or --plan plan.yaml")
    choices = {"offload": (offload, ("none", "optimizer", "all")), "loss": (loss, ("full", "chunked")),
               "recompute": (recompute, ("full", "none")), "attention": (attention, ("varlen", "eager")),
               "precision": (precision, ("bf16", "fp16"))}
    for key, (value, allowed) in choices.items():
        if value is not None and value not in allowed:
            raise ValueError(f"--{key} must be one of {', '.join(allowed)} (got '{value}')")
    arch = resolve_model(model)
    gpu_profile = load_gpu(gpu)
    if precision is None:
        precision = "bf16" if gpu_profile.supports_bf16 else "fp16"
    if sp_degree is not None:
        check_sp_degree(sp_degree, arch)
        if gpus is not None and gpus % sp_degree:
            raise ValueError(f"sp_degree ({sp_degree}) must divide --gpus ({gpus})")
    pins = Pins(num_gpus=gpus, zero_stage=zero_stage, sp_degree=sp_degree, micro_batch_size=micro_batch,
                offload=offload, recompute=recompute, loss=loss, attention=attention)
    req = Request(model=arch, gpu=gpu_profile, seq_len=ctx, precision=precision, chunk_tokens=chunk_tokens, pins=pins)
    result = search(req)
    if result.best is not None:
        layout = result.best.layout
    elif result.shortfalls:
        layout = result.shortfalls[0].layout  # nothing fits: trace the closest layout anyway
    else:
        raise ValueError("no layout matches these options")
    return arch, gpu_profile, layout, precision


def _trace_table(result, analytic) -> Table:
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
        if t is None:
            table.add_row(row["term"], gib(a), "[dim]not traced[/]", "", "")
            continue
        pct = f"{100 * (a - t) / t:+.1f}" if t else ""
        table.add_row(row["term"], gib(a), gib(t), f"{(a - t) / GIB:+,.3f}", pct)
    table.caption = (
        f"peak: analytic at '{analytic.peak_phase}', traced at '{result.peak_phase}'; "
        f"not traced: {', '.join(UNTRACED_TERMS)}"
    )
    return table


@app.command()
def trace(
    plan_path: Optional[Path] = typer.Option(None, "--plan", help="Trace the layout of this plan.yaml."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Profile name, HF config.json or folder, or a size like 7b."),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context length: tokens per packed sequence.", min=1),
    gpu: str = typer.Option("a100-80g", "--gpu", help="GPU profile (ltune gpus)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPU count (default: what ltune plan picks).", min=1),
    zero_stage: Optional[int] = typer.Option(None, "--zero-stage", help="Pin the ZeRO stage.", min=0, max=3),
    sp_degree: Optional[int] = typer.Option(None, "--sp-degree", help="Ulysses sequence-parallel degree.", min=1),
    offload: Optional[str] = typer.Option(None, "--offload", help="none|optimizer|all."),
    loss: Optional[str] = typer.Option(None, "--loss", help="full|chunked."),
    recompute: Optional[str] = typer.Option(None, "--recompute", help="full|none."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Packed sequences per GPU per step.", min=1),
    attention: str = typer.Option("varlen", "--attention", help="varlen or eager."),
    precision: Optional[str] = typer.Option(None, "--precision", help="bf16|fp16."),
    chunk_tokens: int = typer.Option(4096, "--loss-chunk-tokens", help="Tokens per chunk of the chunked loss.", min=1),
    num_docs: Optional[int] = typer.Option(None, "--num-docs", help="Documents packed in each traced sequence (default 4).", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Trace one training step on fake CPU tensors (exact, no GPU) and compare with the plan's breakdown.

    Unpinned layout options are chosen as `ltune plan` would. Needs torch and transformers.
    """
    from .planner.memory import estimate_memory

    try:
        if plan_path is not None:
            plan_obj = load_plan(plan_path)
            arch, layout = plan_obj.model.architecture, plan_obj.layout
            seq_len, prec = plan_obj.training.seq_len, plan_obj.training.precision
            chunk_tokens = plan_obj.training.loss_chunk_tokens
            gpu_profile = load_gpu(plan_obj.hardware.gpu)
            model_name = plan_obj.model.name
        else:
            arch, gpu_profile, layout, prec = _trace_layout_from_options(
                model, ctx, gpu, gpus, zero_stage, sp_degree, offload, loss, recompute, micro_batch, attention,
                precision, chunk_tokens)
            plan_obj, seq_len, model_name = None, ctx, model
        analytic = estimate_memory(arch, gpu_profile, layout, seq_len, precision=prec, chunk_tokens=chunk_tokens)
    except (PlanError, ProfileError, ValueError) as e:
        raise fail(str(e).splitlines()[-1] if "validation error" in str(e) else str(e))
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise fail(f"ltune trace needs torch and transformers (pip install 'ltune[train]'): {e}")
    from .trace import comparable_totals, compare, trace_memory

    try:
        result = trace_memory(arch, seq_len, layout, prec, loss_chunk_tokens=chunk_tokens, num_docs=num_docs,
                              plan=plan_obj)
    except ValueError as e:
        raise fail(str(e))
    a_total, t_total = comparable_totals(result, analytic.terms)
    if as_json:
        out = {
            "model": model_name,
            "gpu": gpu_profile.name,
            "seq_len": seq_len,
            "precision": prec,
            "layout": layout.model_dump(),
            "analytic": {"terms": analytic.terms, "total_bytes": analytic.total_bytes, "peak_phase": analytic.peak_phase},
            "traced": result.model_dump(mode="json"),
            "comparison": compare(result, analytic.terms),
            "comparable": {"analytic_bytes": a_total, "traced_bytes": t_total,
                           "error_pct": 100 * (a_total - t_total) / t_total if t_total else 0.0},
        }
        print(json.dumps(out, indent=2))
        return
    console.print(
        f"[bold]{model_name}[/] ({arch.num_params() / 1e9:.2f}B params) at {seq_len:,} tokens, {prec}, "
        f"on {gpu_profile.display_name}: {_layout_line(layout)}"
    )
    console.print(
        f"traced one step of {layout.micro_batch_size} x {result.tokens_per_rank:,} tokens per rank "
        f"({result.num_docs} documents per sequence) in {result.trace_s:.1f} s, "
        f"{result.max_rss_bytes / 1e9:.2f} GB resident"
    )
    console.print(_trace_table(result, analytic))
    for note in result.corrections:
        console.print(f"[dim]- {note}[/]")


# ---- end trace ----
