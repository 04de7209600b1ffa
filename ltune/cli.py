"""ltune's command line: the only module that prints.

Commands: plan, sweep, check, launch, report, trace, models, gpus, schema.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from .planner.check import DEFAULT_DRIFT_PCT
from .planner.io import PlanError, dump_plan, load_plan
from .planner.options import (
    CLI_FLAGS, DEFAULTS, LayoutOptions, choices, layout_options, parse_ctx, parse_targets, request_from_options,
)
from .planner.schema import CONTROL_CHARACTERS, Layout, Method, Plan, Precision
from .profiles import ProfileError, gpu_names, load_gpu, load_model, model_names
from .profiles.schema import GpuProfile, ModelProfile
from .render import (
    batch_line,
    breakdown_table,
    cost_line,
    per_count_table,
    describe_shortfall,
    gib,
    host_memory_line,
    layout_line,
    method_json,
    method_line,
    plan_json,
    runners_up_table,
    speed_line,
    params_phrase,
    communication_bound_line,
    trace_json,
    trace_table,
)

class _Console(Console):
    """rich's Console, but a closed pipe raises BrokenPipeError (ended with CLOSED_PIPE_EXIT by
    _OneLineErrors) where rich would exit 1, the "does not fit" status."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError("stdout closed")


console = _Console(emoji=False)
err_console = _Console(stderr=True, emoji=False)



def _print_error(message: str) -> None:
    """`error: message` on one line: control characters escaped, brackets printed as they are."""
    line = CONTROL_CHARACTERS.sub(lambda m: repr(m.group())[1:-1], message.strip())
    err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """A one-line error for a user mistake, then the exit code."""
    _print_error(message)
    return typer.Exit(code)


#: exit status when the reader of stdout goes away (`ltune plan ... | head`): the shell's 128 + SIGPIPE,
#: as `yes | head` gives; not 1 ("does not fit") nor 0 (the verdict was not read)
CLOSED_PIPE_EXIT = 141


def _silence_stdout() -> None:
    """Point the stdout descriptor at /dev/null, so that Python's flush at exit cannot fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no descriptor (a test runner's buffer)
        pass


class _OneLineErrors(TyperGroup):
    """ltune's command group: a usage error (a bad, missing or unknown option) is one line
    `error: ...` and exit 2, not click's usage block in typer's rich box; --help is unchanged.
    A closed stdout (`| head`) ends the command quietly with CLOSED_PIPE_EXIT."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _silence_stdout()
            raise typer.Exit(CLOSED_PIPE_EXIT) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:  # typer >= 0.20 vendors click
            from typer._click.exceptions import ClickException, NoArgsIsHelpError
        except ImportError:
            from click.exceptions import ClickException

            NoArgsIsHelpError = getattr(sys.modules["click.exceptions"], "NoArgsIsHelpError", ())
        from typer import Abort

        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        except NoArgsIsHelpError as e:  # bare `ltune`: the help, as click shows it
            if not standalone_mode:
                raise
            e.show()
            code = e.exit_code
        except ClickException as e:
            if not standalone_mode:
                raise
            _print_error(" ".join(e.format_message().split()))
            code = 2
        except Abort:
            if not standalone_mode:
                raise
            _print_error("aborted")
            code = 1
        if not standalone_mode:
            return code
        try:  # what print() left in the buffer
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
            code = CLOSED_PIPE_EXIT
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Plan, check and launch long-context LLM fine-tuning jobs.",
)


# ---------------------------------------------------------------- shared layout options
# The options of LayoutOptions (planner/options.py): flag names from CLI_FLAGS, --help from
# the field descriptions (the plan schema's), defaults from the model.


def _help(field: str, note: str = "") -> str:
    """--help of a layout option: its choices, its description, then `note`."""
    description = LayoutOptions.model_fields[field].description
    values = choices(field)
    starts_with_value = description.split()[0].strip(":,") in map(str, values)
    text = f"{description if starts_with_value else description[0].upper() + description[1:]}."
    if values:
        text = f"{'|'.join(str(v) for v in values)}. {text}"
    return f"{text} {note}".strip()


def _option(field: str, *aliases: str, note: str = "", **limits) -> typer.models.OptionInfo:
    """The typer option of one LayoutOptions field."""
    return typer.Option(CLI_FLAGS[field], *aliases, help=_help(field, note), **limits)


_PIN = "Unpinned, the search chooses."
ModelOpt = Annotated[str, _option("model", "-m")]
CtxOpt = Annotated[int, _option("seq_len", min=1)]
GpuOpt = Annotated[str, _option("gpu", note="Any case; 'auto': this machine's GPU, named by nvidia-smi.")]
GpusOpt = Annotated[Optional[int], _option("num_gpus", note="Unpinned, the search tries powers of two.", min=1)]
MaxGpusOpt = Annotated[int, _option("max_gpus", min=1)]
ZeroOpt = Annotated[Optional[int], _option("zero_stage", note=_PIN, min=0, max=3)]
SpOpt = Annotated[Optional[int], _option("sp_degree", note=_PIN, min=1)]
OffloadOpt = Annotated[Optional[str], _option("offload", note="Unpinned, the search tries none, optimizer and all at every GPU count.")]
LossOpt = Annotated[Optional[str], _option("loss", note=_PIN)]
RecomputeOpt = Annotated[Optional[str], _option("recompute", note=_PIN)]
MicroBatchOpt = Annotated[Optional[int], _option("micro_batch_size", note=_PIN, min=1)]
AttentionOpt = Annotated[str, _option("attention")]
PrecisionOpt = Annotated[Optional[str], _option("precision")]
ChunkOpt = Annotated[int, _option("loss_chunk_tokens", min=1)]
HostMemOpt = Annotated[Optional[float], _option("host_mem_gib", min=0.0)]
MarginOpt = Annotated[float, _option("safety_margin", min=0.0, max=0.5)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
PlanCtxOpt = Annotated[str, typer.Option(
    "--ctx", help=_help("seq_len", "Or 'max': the longest context that fits (at --gpus, else at any GPU count "
                        "searched), in multiples of 1,024 tokens."))]
GlobalBatchOpt = Annotated[Optional[int], _option("global_batch", min=1)]
TokensPerStepOpt = Annotated[Optional[int], _option("tokens_per_step", min=1)]
PreferOpt = Annotated[str, _option("prefer", note="Default fewest.")]
DocTokensOpt = Annotated[Optional[int], _option("doc_tokens", min=1)]
MethodOpt = Annotated[str, _option("method", note="Default full.")]
LoraRankOpt = Annotated[Optional[int], _option("lora_rank")]
LoraAlphaOpt = Annotated[Optional[float], _option("lora_alpha")]
LoraDropoutOpt = Annotated[Optional[float], _option("lora_dropout")]
LoraTargetsOpt = Annotated[Optional[str], _option("lora_targets")]
QuantTypeOpt = Annotated[Optional[str], _option("quant_type")]
DoubleQuantOpt = Annotated[Optional[bool], _option("double_quant")]
QuantStorageOpt = Annotated[Optional[str], _option("quant_storage")]
ExportMergedOpt = Annotated[bool, _option("export_merged")]


def _method_options(method: str, lora_rank, lora_alpha, lora_dropout, lora_targets, quant_type, double_quant,
                    quant_storage, export_merged: bool = False) -> dict:
    """The method flags as LayoutOptions fields (--lora-targets split at commas; --export-merged
    only when given); ValueError naming the flag for a bad value."""
    return dict(method=method, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                lora_targets=parse_targets(lora_targets), quant_type=quant_type, double_quant=double_quant,
                quant_storage=quant_storage, export_merged=export_merged or None)

def _one_line(e: Exception) -> str:
    """A pydantic error as its first field path and message; others as they are."""
    from pydantic import ValidationError

    from .planner.io import describe_error

    return describe_error(e.errors()[0]) if isinstance(e, ValidationError) else str(e)


# ---------------------------------------------------------------- plan, check


def _print_plan(req, result, model_name: str, longest=None) -> None:
    from .planner.build import checkpoint_for
    from .planner.search import DEFAULT_TOKENS_PER_STEP, PREFER_HELP
    from .render import checkpoint_line

    m, g = req.model, req.gpu
    generic = (f" [yellow]({escape(m.source)}: {m.num_attention_heads} heads, {m.num_kv_heads} kv, "
               f"ffn {m.intermediate_size}, vocab {m.vocab_size})[/]") if m.generic else ""
    console.print(
        f"[bold]{escape(model_name)}[/] ({params_phrase(m)}, {m.num_layers} layers, hidden "
        f"{m.hidden_size}){generic} at {req.seq_len:,} tokens, {req.precision}, on {g.display_name} "
        f"({gib(g.hbm_bytes)} GiB; plans keep a {100 * req.safety_margin:.0f}% safety margin)"
    )
    console.print(method_line(req.model, req.method, req.precision), highlight=False)
    if longest is not None:
        console.print(
            f"[bold]longest context:[/] {longest.seq_len:,} tokens (a multiple of {longest.granularity:,}; "
            f"{longest.seq_len + longest.granularity:,} fits no layout; {longest.probes} scans in "
            f"{longest.seconds * 1000:.0f} ms)"
        )
    if req.global_batch is not None:
        source = "--global-batch"
    else:
        budget = req.tokens_per_step or DEFAULT_TOKENS_PER_STEP
        source = (f"{'--tokens-per-step' if req.tokens_per_step else 'default'} {budget:,} tokens per step / "
                  f"{req.seq_len:,}, rounded up to a power of two")
    console.print(
        f"global batch: {result.global_batch:,} sequences = {result.tokens_per_step:,} tokens per optimizer step, "
        f"the same for every layout ({source}); recommending {PREFER_HELP[result.prefer]} (--prefer {result.prefer})",
        highlight=False,
    )
    best = result.best
    if best is not None:
        console.print(f"\n[bold green]recommended:[/] {layout_line(best.layout)}")
        if best.layout.attention == "varlen" and not g.supports_bf16 and g.name != "cpu":
            # bf16 came with Ampere: a GPU without it is pre-Ampere (V100), where trainer/attention.py runs SDPA
            console.print(f"  [yellow]attention on {escape(g.display_name)}: flash-attn and PyTorch's varlen kernel "
                          "need Ampere (sm80); the trainer runs scaled_dot_product_attention once per document "
                          "instead (PyTorch's math backend on 3-D inputs); this plan counts its fp32 probabilities per document[/]", highlight=False)
        console.print(f"  {batch_line(best, req.seq_len)}")
        console.print(f"  {speed_line(best)}")
        bound = communication_bound_line(best, m, g) if m.is_moe else None  # dense plans' output unchanged
        if bound:
            console.print(f"  [yellow]{bound}[/]", highlight=False)
        console.print(f"  {cost_line(best)}")
        console.print(f"  {checkpoint_line(checkpoint_for(req, best))}", highlight=False)
        console.print(breakdown_table(best, "per-GPU memory"))
        if best.layout.offload != "none" or best.memory.host_bytes_per_node > best.memory.host_capacity_bytes_per_node:
            console.print(f"  {host_memory_line(best.memory)}", highlight=False)
    if result.no_offload is not None:
        ev = result.no_offload
        console.print(f"[bold]without offload:[/] {layout_line(ev.layout)}; {speed_line(ev)}; {cost_line(ev)}")
    if result.per_count:
        console.print(per_count_table(result))
    if result.runners_up:
        console.print(runners_up_table(result.runners_up))
    conv = result.conventional
    from .planner.search import conventional_zero_stage, gpu_counts

    recipe = (f"\n[bold]conventional (ZeRO-{conventional_zero_stage(req)}, no sp, no offload, full recompute, "
              "full loss, micro-batch 1):[/]")
    if conv is None:
        counts = gpu_counts(req.pins)
        where = f"{counts[0]:,} to {counts[-1]:,} GPUs" if len(counts) > 1 else f"{counts[0]:,} GPU{'s' if counts[0] > 1 else ''}"
        console.print(f"{recipe} fits at no GPU count searched ({where})", highlight=False)
    elif best is not None and conv.layout == best.layout:
        console.print(f"{recipe} the recommended layout", highlight=False)
    else:
        console.print(
            f"{recipe} {conv.layout.num_gpus} GPU{'s' if conv.layout.num_gpus > 1 else ''}, "
            f"{gib(conv.memory.total_bytes)} GiB, {speed_line(conv)}"
        )
    console.print(f"[dim]{result.evaluated:,} layouts evaluated in {result.seconds * 1000:.0f} ms[/]")


def _report_no_fit(closest) -> None:
    sf = closest.shortfall
    err_console.print(f"[bold red]no layout fits;[/] closest: {layout_line(sf.layout)}, {describe_shortfall(sf)}")
    if not closest.remedies:
        err_console.print("  - no change ltune can judge brings it closer")
    for remedy in closest.remedies:
        err_console.print(f"  - {escape(remedy.text)}", highlight=False)


def _write_plan(req, best, model_name: str, output: Path, host_mem_gib, training: dict, model_files: dict,
                quiet: bool) -> None:
    """Write plan.yaml, with data and model paths relative to the plan file (launch's rule)."""
    from .planner.build import build_plan, model_folder_for_plan, relative_to_plan

    files = {k: model_folder_for_plan(str(v), output) for k, v in model_files.items() if v is not None}
    training = {**training, "data": [relative_to_plan(p, output) for p in training["data"]]}
    try:
        plan_obj = build_plan(req, best, model_name, training, host_mem_gib, files)
        dump_plan(plan_obj, output)
    except ValueError as e:
        raise fail(_one_line(e))
    if not quiet:
        console.print(f"wrote {output}")


@app.command()
def plan(
    model: ModelOpt,
    ctx: PlanCtxOpt,
    gpu: GpuOpt = DEFAULTS["gpu"],
    num_gpus: GpusOpt = None,
    max_gpus: MaxGpusOpt = DEFAULTS["max_gpus"],
    global_batch: GlobalBatchOpt = None,
    tokens_per_step: TokensPerStepOpt = None,
    prefer: PreferOpt = DEFAULTS["prefer"],
    doc_tokens: DocTokensOpt = None,
    zero_stage: ZeroOpt = None,
    sp_degree: SpOpt = None,
    offload: OffloadOpt = None,
    loss: LossOpt = None,
    recompute: RecomputeOpt = None,
    micro_batch_size: MicroBatchOpt = None,
    attention: AttentionOpt = DEFAULTS["attention"],
    precision: PrecisionOpt = None,
    host_mem_gib: HostMemOpt = None,
    safety_margin: MarginOpt = DEFAULTS["safety_margin"],
    loss_chunk_tokens: ChunkOpt = DEFAULTS["loss_chunk_tokens"],
    method: MethodOpt = DEFAULTS["method"],
    lora_rank: LoraRankOpt = None,
    lora_alpha: LoraAlphaOpt = None,
    lora_dropout: LoraDropoutOpt = None,
    lora_targets: LoraTargetsOpt = None,
    quant_type: QuantTypeOpt = None,
    double_quant: DoubleQuantOpt = None,
    quant_storage: QuantStorageOpt = None,
    export_merged: ExportMergedOpt = False,
    steps: Annotated[int, typer.Option("--steps", help="Training steps written to plan.yaml.", min=1)] = 1000,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate written to plan.yaml (> 0).")] = 2e-5,
    data: Annotated[Optional[list[str]], typer.Option("--data", help="JSONL file or folder (repeatable), written to plan.yaml.")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", help="Local tokenizer folder, written to plan.yaml.")] = None,
    model_path: Annotated[Optional[Path], typer.Option("--model-path", help="HF model folder (safetensors), or org/name in the local Hugging Face cache, written to plan.yaml; random init if unset.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the recommended plan to this plan.yaml.")] = None,
    chart: Annotated[Optional[str], typer.Option("--chart", help="Draw the per-GPU memory of the pick and the runners-up (stacked terms against capacity and safety margin) to this .png or .svg (needs matplotlib: pip install -e \".[plot]\").")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Find the best layout at every GPU count for one global batch, recommend one, and show why.

    Every layout runs the same global batch (default 4Mi tokens per step; --global-batch or
    --tokens-per-step); offload is tried at every GPU count; --prefer picks fewest GPUs (default),
    fastest or cheapest. --ctx max finds the longest context that fits. --method lora or qlora
    plans adapter fine-tuning (frozen base weights; qlora: in 4 bits, CUDA, ZeRO 0-2).

    Exit 0 when a layout fits, 1 when none does, 2 for bad input.
    """
    from .planner.build import check_plan_fields
    from .planner.io import check_output_path
    from .planner.search import CTX_GRANULARITY, longest_context, search

    training = {"max_steps": steps, "learning_rate": lr, "data": data or []}
    model_files = {"path": model_path, "tokenizer": tokenizer}
    try:
        check_plan_fields(training, model_files)
        if output is not None:
            output = check_output_path(output)
        chart_fmt = _chart_format(chart, "--chart") if chart is not None else None
        seq_len = parse_ctx(ctx)
        options = layout_options(
            model=model, seq_len=seq_len or CTX_GRANULARITY, gpu=gpu, num_gpus=num_gpus, max_gpus=max_gpus,
            zero_stage=zero_stage, sp_degree=sp_degree, offload=offload, loss=loss, recompute=recompute,
            micro_batch_size=micro_batch_size, attention=attention, precision=precision, host_mem_gib=host_mem_gib,
            safety_margin=safety_margin, loss_chunk_tokens=loss_chunk_tokens, global_batch=global_batch,
            tokens_per_step=tokens_per_step, prefer=prefer, doc_tokens=doc_tokens,
            **_method_options(method, lora_rank, lora_alpha, lora_dropout, lora_targets, quant_type, double_quant,
                              quant_storage, export_merged),
        )
        req = request_from_options(options)
    except (ProfileError, ValueError) as e:
        raise fail(_one_line(e))
    longest = None
    if seq_len is None:  # --ctx max
        longest = longest_context(req)
        if longest.seq_len is None:
            if not as_json:
                err_console.print(f"[bold red]no context fits:[/] not even {CTX_GRANULARITY:,} tokens; at "
                                  f"{CTX_GRANULARITY:,} tokens:", highlight=False)
        else:
            req = req.model_copy(update={"seq_len": longest.seq_len})
    result = search(req)
    from .planner.warnings import context_warning

    past_context = context_warning(req.model, req.seq_len)
    if past_context:
        err_console.print(f"[yellow]warning:[/] {escape(past_context)}", highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps(plan_json(req, result, model, longest), indent=2))
    else:
        _print_plan(req, result, model, longest if longest is not None and longest.seq_len else None)
    if chart is not None:
        _plan_chart(req, result, model, chart, chart_fmt, quiet=as_json)
    if result.best is None:
        if result.closest is not None and not as_json:
            _report_no_fit(result.closest)
        raise typer.Exit(1)
    if output is not None:
        _write_plan(req, result.best, model, output, host_mem_gib, training, model_files, quiet=as_json)


def _chart_format(path: str, flag: str) -> str:
    """png or svg from the file name, with matplotlib importable; else a one-line error (exit 2)."""
    from .charts import chart_format, require_matplotlib

    fmt = chart_format(path, flag)
    require_matplotlib(flag)
    return fmt


def _draw(draw, *args, path: str, quiet: bool, **kwargs) -> None:
    """Run one chart function; an unwritable file is a one-line error (exit 2)."""
    try:
        draw(*args, path, **kwargs)
    except OSError as e:
        raise fail(f"cannot write chart {path}: {e.strerror or e}")
    if not quiet:
        console.print(f"wrote chart {escape(str(path))}", highlight=False)


def _plan_chart(req, result, model_name: str, path: str, fmt: str, quiet: bool) -> None:
    """--chart: the pick and the runners-up (the closest layout when nothing fits)."""
    from .charts import memory_chart
    from .render import chart_label

    if result.best is not None:
        evaluations, first = [result.best, *result.runners_up], "pick"
    elif result.closest is not None:
        evaluations, first = [result.closest.evaluation], "closest (does not fit)"
    else:
        return
    labels = [f"{first if i == 0 else f'runner-up {i}'}\n{chart_label(ev.layout)}" for i, ev in enumerate(evaluations)]
    title = (f"{model_name} at {req.seq_len:,} tokens on {req.gpu.display_name}: per-GPU memory "
             f"({100 * req.safety_margin:.0f}% safety margin)")
    _draw(memory_chart, evaluations, labels, path=path, quiet=quiet, title=title, fmt=fmt)


# ---------------------------------------------------------------- sweep


def _sweep_progress(total: int):
    """A transient rich progress bar on stderr when it is a terminal; else nothing."""
    if not err_console.is_terminal:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("sweep: {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err_console, transient=True)


@app.command()
def sweep(
    model: ModelOpt,
    ctx: Annotated[Optional[str], typer.Option("--ctx", help="Context lengths, comma-separated: 8k,32k,128k (k = 1,024, m = 1,048,576). Default: 4k to 1M, powers of two.")] = None,
    gpu: Annotated[Optional[list[str]], typer.Option("--gpu", help="GPU profile (repeatable or comma-separated; see ltune gpus). Default: a100-80g, h100-80g, h200, b200.")] = None,
    max_gpus: MaxGpusOpt = DEFAULTS["max_gpus"],
    tokens_per_step: TokensPerStepOpt = None,
    doc_tokens: DocTokensOpt = None,
    offload: OffloadOpt = None,
    attention: AttentionOpt = DEFAULTS["attention"],
    precision: PrecisionOpt = None,
    host_mem_gib: HostMemOpt = None,
    safety_margin: MarginOpt = DEFAULTS["safety_margin"],
    method: MethodOpt = DEFAULTS["method"],
    lora_rank: LoraRankOpt = None,
    lora_alpha: LoraAlphaOpt = None,
    lora_dropout: LoraDropoutOpt = None,
    lora_targets: LoraTargetsOpt = None,
    quant_type: QuantTypeOpt = None,
    double_quant: DoubleQuantOpt = None,
    quant_storage: QuantStorageOpt = None,
    png: Annotated[Optional[str], typer.Option("--png", help="Draw GPUs needed vs context per GPU type to this PNG (needs matplotlib: pip install -e \".[plot]\").")] = None,
    svg: Annotated[Optional[str], typer.Option("--svg", help="The same chart as SVG.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """For each context and GPU type: the fewest GPUs that fit, the layout, tokens/s/GPU and
    GPU-hours per billion tokens (the search of `ltune plan --prefer fewest`, per cell).

    Exit 0 when some cell fits, 1 when none does, 2 for bad input.
    """
    from .charts import require_matplotlib
    from .planner.sweep import DEFAULT_CONTEXTS, DEFAULT_SWEEP_GPUS, parse_contexts, split_names, sweep as run_sweep
    from .planner.search import DEFAULT_TOKENS_PER_STEP
    from .planner.sweep import sweep_requests
    from .render import sweep_json, sweep_matrix_table, sweep_table

    try:
        for flag, path in (("--png", png), ("--svg", svg)):
            if path is not None:
                require_matplotlib(flag)
        contexts = parse_contexts(ctx) if ctx is not None else DEFAULT_CONTEXTS
        gpus = split_names(gpu) if gpu else DEFAULT_SWEEP_GPUS
        options = dict(model=model, max_gpus=max_gpus, tokens_per_step=tokens_per_step, doc_tokens=doc_tokens,
                       offload=offload, attention=attention, precision=precision, host_mem_gib=host_mem_gib,
                       safety_margin=safety_margin,
                       **_method_options(method, lora_rank, lora_alpha, lora_dropout, lora_targets, quant_type,
                                         double_quant, quant_storage))
        requests = sweep_requests(options, gpus, contexts)
    except (ProfileError, ValueError) as e:
        raise fail(_one_line(e))
    progress = _sweep_progress(len(requests))
    if progress is None:
        result = run_sweep(model, requests)
    else:
        with progress:
            task = progress.add_task(f"{len(requests)} cells", total=len(requests))

            def advance(cell) -> None:
                progress.update(task, advance=1, description=f"done {cell.gpu} at {cell.seq_len:,} tokens")

            result = run_sweep(model, requests, on_cell=advance)
    if as_json:
        print(json.dumps(sweep_json(result), indent=2))
    else:
        if requests:
            r0 = requests[0]
            console.print(method_line(r0.model, r0.method, r0.precision), highlight=False)
        console.print(sweep_matrix_table(result))
        console.print(sweep_table(result))
        console.print(f"[dim]{len(result.cells)} searches, {sum(c.evaluated for c in result.cells):,} layouts "
                      f"evaluated in {result.seconds:.2f} s; {tokens_per_step or DEFAULT_TOKENS_PER_STEP:,} tokens per "
                      f"optimizer step (in whole sequences, a power of two)[/]")
    from .charts import sweep_chart

    for path, fmt in ((png, "png"), (svg, "svg")):
        if path is not None:
            _draw(sweep_chart, result, path=path, quiet=as_json, fmt=fmt)
    if not any(c.fits for c in result.cells):
        raise typer.Exit(1)


CHECK_FORMATS = ("text", "json", "junit", "github")


def _check_format(output_format: str | None) -> str:
    """--format, else github inside GitHub Actions (GITHUB_ACTIONS=true), else text."""
    import os

    if output_format is None:
        return "github" if os.environ.get("GITHUB_ACTIONS") == "true" else "text"
    if output_format not in CHECK_FORMATS:
        raise fail(f"--format must be one of {', '.join(CHECK_FORMATS)} (got {output_format!r})")
    return output_format


def _check_options(gpu: list[str], safety_margin: float | None, drift: float, strict_drift: bool):
    """The check options from the flags, or a one-line error naming the flag (exit 2)."""
    from .planner.check import CheckOptions

    if safety_margin is not None and not 0 <= safety_margin < 1:
        raise fail(f"--safety-margin must be at least 0 and below 1 (got {safety_margin})")
    if not 0 <= drift < float("inf"):
        raise fail(f"--drift must be a finite percentage of at least 0 (got {drift})")
    targets: list[str] = []
    for name in gpu:
        try:
            canonical = load_gpu(name).name
        except ProfileError as e:
            raise fail(f"--gpu: {e}")
        if canonical not in targets:
            targets.append(canonical)
    return CheckOptions(gpus=tuple(targets), safety_margin=safety_margin, drift_pct=drift, strict_drift=strict_drift)


def _print_check(report, output_format: str) -> None:
    from .render_check import check_json, failure_tables, github_lines, junit_xml, summary_line, text_lines

    if output_format == "json":
        print(json.dumps(check_json(report), indent=2))
    elif output_format == "junit":
        print(junit_xml(report))
    elif output_format == "github":
        print("\n".join([*github_lines(report), summary_line(report)]))
    else:
        print("\n".join(text_lines(report)))
        for table in failure_tables(report):
            _Console(emoji=False, width=10_000).print(table)
        print(summary_line(report))


@app.command()
def check(
    paths: Annotated[list[str], typer.Argument(metavar="PATH...", help="Plan files, or folders searched recursively for *.yaml and *.yml.")],
    gpu: Annotated[Optional[list[str]], typer.Option("--gpu", help="Also check each plan, same layout and job, on this GPU profile (repeatable; see ltune gpus).")] = None,
    safety_margin: Annotated[Optional[float], typer.Option("--safety-margin", help="Fraction of GPU memory kept free, 0 <= m < 1. Default: the plan's own, as ltune launch re-checks it (the planner's 0.05 for a plan without a prediction).")] = None,
    drift: Annotated[float, typer.Option("--drift", help="Warn when today's predicted memory differs from the plan's stored prediction by more than this many percent.")] = DEFAULT_DRIFT_PCT,
    strict_drift: Annotated[bool, typer.Option("--strict-drift", help="Drift beyond --drift fails the check (exit 1) instead of warning.")] = False,
    output_format: Annotated[Optional[str], typer.Option("--format", help="text|json|junit|github. Default: github when GITHUB_ACTIONS=true, else text.")] = None,
) -> None:
    """For CI: re-check that each plan still fits its GPUs with today's memory model.

    One line per plan and GPU target: the verdict, the total against the usable capacity, the headroom.

    Exit 0 when every plan fits, 1 when any does not, 2 when any input is invalid (every other plan is still checked).
    """
    from .planner.check import check_paths

    output_format = _check_format(output_format)
    report = check_paths(paths, _check_options(gpu or [], safety_margin, drift, strict_drift))
    _print_check(report, output_format)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


# ---------------------------------------------------------------- launch


def _report_fit(plan, spec) -> None:
    """One line when the plan fits; the breakdown and a warning when forced."""
    from .launcher import shortfall_message

    if spec.forced:
        console.print(breakdown_table(spec.evaluation, "memory per GPU (fit re-check)", limits=True))
        err_console.print(f"[yellow]warning:[/] {escape(shortfall_message(plan, spec.evaluation))}; launching anyway "
                          "(--force)", highlight=False, soft_wrap=True)
    else:
        mem = spec.evaluation.memory
        console.print(
            f"[bold]fit[/] {gib(mem.total_bytes)} of {gib(mem.usable_bytes)} GiB usable per GPU "
            f"({escape(plan.hardware.gpu)}, {spec.nodes.nnodes} x {spec.nodes.nproc_per_node})",
            highlight=False,
        )


def _warn_about_plan(plan) -> None:
    """The plan's one-line warnings (trust_remote_code) on stderr, before it is used."""
    from .planner.warnings import trust_remote_code_warning

    text = trust_remote_code_warning(plan)
    if text:
        err_console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)


def _command_lines(spec) -> tuple[str, str]:
    import shlex

    return (" ".join(f"{k}={shlex.quote(v)}" for k, v in spec.env.items()),
            " ".join(shlex.quote(a) for a in spec.argv))


def _print_dry_run(spec) -> None:
    env_line, command_line = _command_lines(spec)
    console.print(f"[bold]run folder[/] {escape(str(spec.run_dir))} (not written: --dry-run)", highlight=False)
    console.print(f"[bold]env[/] {escape(env_line)}", highlight=False, soft_wrap=True)
    console.print(f"[bold]command[/] {escape(command_line)}", highlight=False, soft_wrap=True)
    if spec.sbatch is not None:
        console.print("[bold]sbatch script[/]")
        print(spec.sbatch, end="")
    console.print("[bold]ds_config.json[/]")
    print(json.dumps(spec.ds_config, indent=2))


def _write_and_start(spec, submit: bool) -> int:
    """Write the run folder, then start the job (or only write, for slurm without --submit).

    A job that fails before its first step leaves no run folder for --resume to mistake for a run.
    """
    import shutil

    from .launcher import LaunchError, start, write_spec
    from .launcher.process import discard_failed_launch

    def discard_if_never_ran(code: int) -> None:
        folder = escape(str(spec.run_dir))
        try:
            found = discard_failed_launch(spec, code)
        except OSError as e:
            err_console.print(f"could not remove run folder {folder}: {e.strerror}", highlight=False, soft_wrap=True)
            return
        if found is not None and found.other:
            err_console.print(f"kept run folder {folder}: the job logged no step, but the folder holds "
                              f"{escape(', '.join(found.other))} besides ltune's files", highlight=False, soft_wrap=True)
        elif found is not None:
            err_console.print(f"removed run folder {folder}: the job stopped before its first step "
                              f"(removed {', '.join(found.ours)})", highlight=False, soft_wrap=True)

    if spec.launcher == "slurm" and submit and shutil.which("sbatch") is None:
        raise fail("--submit: sbatch not found on PATH (write the script without --submit)")
    try:
        write_spec(spec)
    except OSError as e:
        raise fail(f"cannot write run folder {spec.run_dir}: {e.strerror}")
    console.print(f"[bold]run folder[/] {escape(str(spec.run_dir))}", highlight=False)
    env_line, command_line = _command_lines(spec)
    if spec.launcher == "slurm" and not submit:
        console.print(f"submit with: {escape(command_line)}", highlight=False, soft_wrap=True)
        return 0
    console.print(f"[bold]starting[/] {escape(env_line)} {escape(command_line)}", highlight=False, soft_wrap=True)
    try:
        code = start(spec)
    except LaunchError as e:
        discard_if_never_ran(e.exit_code)
        raise fail(str(e), e.exit_code)
    discard_if_never_ran(code)
    return code


@app.command()
def launch(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN", help="plan.yaml written by `ltune plan`.")],
    launcher: Annotated[str, typer.Option("--launcher", help="deepspeed (DeepSpeed's runner), torchrun, or slurm (writes an sbatch script).")] = "deepspeed",
    hostfile: Annotated[Optional[Path], typer.Option("--hostfile", help="deepspeed: MPI-style hostfile ('host slots=N' per line) for several nodes.")] = None,
    nnodes: Annotated[Optional[int], typer.Option("--nnodes", help="Nodes (default: the plan's, or as many as its GPU profile needs).")] = None,
    node_rank: Annotated[Optional[int], typer.Option("--node-rank", help="This node's rank when each node is started by hand.")] = None,
    master_addr: Annotated[Optional[str], typer.Option("--master-addr", help="Address of node 0 (several nodes).")] = None,
    master_port: Annotated[Optional[int], typer.Option("--master-port", help="Rendezvous port (default 29500; a free port for the cpu target).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Run folder (default: the plan's training.output_dir).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the run folder from its latest checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Launch even if the fit re-check says the plan does not fit.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the command and the DeepSpeed config; write and start nothing.")] = False,
    submit: Annotated[bool, typer.Option("--submit", help="slurm: also submit the script with sbatch.")] = False,
) -> None:
    """Launch a plan: re-check its fit, write the run folder, start the job.

    The run folder gets plan.yaml (paths made absolute), ds_config.json and command.json.

    Every process runs `python -m ltune.trainer RUN_DIR`, started by DeepSpeed's launcher or torchrun.

    Output is streamed and ltune exits with the job's exit code.

    A plan that no longer fits is refused (exit 1) unless --force.

    A bad plan, data, hostfile or port is a one-line error (exit 2); nothing is written.
    """
    from .launcher import FitRefused, LaunchError, LaunchOptions, plan_launch

    try:
        plan_obj = load_plan(plan_file)
        from .job.methods import refuse_unrunnable_method  # qlora without CUDA: refused before anything starts

        # a dry run starts nothing here: only what no machine could run is refused (the cpu target)
        refuse_unrunnable_method(plan_obj, local=launcher != "slurm" and hostfile is None and not dry_run)
        options = LaunchOptions(
            launcher=launcher, hostfile=str(hostfile) if hostfile else None, nnodes=nnodes, node_rank=node_rank,
            master_addr=master_addr, master_port=master_port, run_dir=str(run_dir) if run_dir else None,
            resume=resume, force=force, dry_run=dry_run,
            # the trainer's stderr is a pipe under DeepSpeed's launcher: tell it when ours is a terminal
            progress="tty" if err_console.is_terminal else None,
        )
        spec = plan_launch(plan_obj, plan_file, options)
    except FitRefused as e:
        console.print(breakdown_table(e.evaluation, "memory per GPU (fit re-check)", limits=True))
        raise fail(f"{e} (--force launches it anyway)", e.exit_code)
    except (PlanError, LaunchError) as e:
        raise fail(str(e), getattr(e, "exit_code", 2))
    _warn_about_plan(plan_obj)
    for text in spec.warnings:  # a stop that cannot save in time; variables not carried to other nodes
        err_console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)
    _report_fit(plan_obj, spec)
    if dry_run:
        _print_dry_run(spec)
        return
    code = _write_and_start(spec, submit)
    if code:
        where = f" (run folder {escape(str(spec.run_dir))})" if spec.run_dir.exists() else ""
        err_console.print(f"[bold red]job exited with code {code}[/]{where}", highlight=False)
    raise typer.Exit(code)


# ---------------------------------------------------------------- trace


@dataclass(frozen=True)
class TraceTarget:
    """What `ltune trace` traces: a plan's layout, or the one `ltune plan` picks."""

    name: str  # what --model was given, or the plan's model name
    model: ModelProfile
    gpu: GpuProfile
    layout: Layout
    seq_len: int
    precision: Precision
    loss_chunk_tokens: int
    plan: Plan | None = None  # when tracing a plan
    method: Method = Method()  # what trains: the plan's, or --method's


def _plan_target(plan_path: Path) -> TraceTarget:
    p = load_plan(plan_path)
    return TraceTarget(name=p.model.name, model=p.model.architecture, gpu=load_gpu(p.hardware.gpu), layout=p.layout,
                       seq_len=p.training.seq_len, precision=p.training.precision,
                       loss_chunk_tokens=p.training.loss_chunk_tokens, plan=p, method=p.method)


def _search_target(options: LayoutOptions) -> TraceTarget:
    """The layout `ltune plan` picks for these options (the closest if none fits)."""
    from .planner.search import search

    req = request_from_options(options)
    result = search(req)
    if result.best is not None:
        layout = result.best.layout
    elif result.closest is not None:
        layout = result.closest.shortfall.layout  # nothing fits: trace the closest layout anyway
    else:
        raise ValueError("no layout matches these options")
    return TraceTarget(name=options.model, model=req.model, gpu=req.gpu, layout=layout, seq_len=req.seq_len,
                       precision=req.precision, loss_chunk_tokens=req.loss_chunk_tokens, method=req.method)


@app.command()
def trace(
    plan_path: Annotated[Optional[Path], typer.Option("--plan", help="Trace the layout of this plan.yaml.")] = None,
    model: Annotated[Optional[str], _option("model", "-m")] = None,
    seq_len: Annotated[Optional[str], _option("seq_len", note="Also 8k, 32k, 1m (k = 1,024).")] = None,
    gpu: GpuOpt = DEFAULTS["gpu"],
    num_gpus: GpusOpt = None,
    zero_stage: ZeroOpt = None,
    sp_degree: SpOpt = None,
    offload: OffloadOpt = None,
    loss: LossOpt = None,
    recompute: RecomputeOpt = None,
    micro_batch_size: MicroBatchOpt = None,
    attention: AttentionOpt = DEFAULTS["attention"],
    precision: PrecisionOpt = None,
    loss_chunk_tokens: ChunkOpt = DEFAULTS["loss_chunk_tokens"],
    num_docs: Annotated[Optional[int], typer.Option("--num-docs", help="Documents packed in each traced sequence (default 4).", min=1)] = None,
    method: MethodOpt = DEFAULTS["method"],
    lora_rank: LoraRankOpt = None,
    lora_alpha: LoraAlphaOpt = None,
    lora_dropout: LoraDropoutOpt = None,
    lora_targets: LoraTargetsOpt = None,
    quant_type: QuantTypeOpt = None,
    double_quant: DoubleQuantOpt = None,
    quant_storage: QuantStorageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Trace one training step on fake CPU tensors (exact, no GPU) and compare with the plan's breakdown.

    Unpinned layout options are chosen as `ltune plan` would. Needs torch and transformers.
    """
    from .planner.memory import estimate_memory

    try:
        if plan_path is not None:
            method_flags = _method_options(method, lora_rank, lora_alpha, lora_dropout, lora_targets, quant_type,
                                           double_quant, quant_storage)
            given = [CLI_FLAGS[k] for k, v in method_flags.items() if v not in (None, DEFAULTS["method"])]
            if given:
                raise ValueError(f"{given[0]}: a plan brings its own method (its `method` block); give one or the other")
            target = _plan_target(plan_path)
            _warn_about_plan(target.plan)
        elif model is None or seq_len is None:
            raise ValueError("give --model and --ctx, or --plan plan.yaml")
        else:
            target = _search_target(layout_options(
                model=model, seq_len=parse_ctx(seq_len, allow_max=False), gpu=gpu, num_gpus=num_gpus, zero_stage=zero_stage, sp_degree=sp_degree,
                offload=offload, loss=loss, recompute=recompute, micro_batch_size=micro_batch_size,
                attention=attention, precision=precision, loss_chunk_tokens=loss_chunk_tokens,
                **_method_options(method, lora_rank, lora_alpha, lora_dropout, lora_targets, quant_type, double_quant,
                                  quant_storage),
            ))
        analytic = estimate_memory(target.model, target.gpu, target.layout, target.seq_len, precision=target.precision,
                                   loss_chunk_tokens=target.loss_chunk_tokens, method=target.method)
    except (PlanError, ProfileError, ValueError) as e:
        raise fail(_one_line(e))
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise fail(f"ltune trace needs torch and transformers (pip install 'ltune[train]'): {e}")
    from .trace import trace_memory

    from .trace.tracer import PHASES

    layout, seq_len, prec = target.layout, target.seq_len, target.precision
    try:
        # which phase the trace is in, on stderr (rich draws nothing when it is not a terminal)
        with err_console.status("tracing", spinner="dots") as status:
            def on_phase(name: str) -> None:
                status.update(f"tracing: {PHASES.get(name, name)}")

            result = trace_memory(target.model, seq_len, layout, prec, loss_chunk_tokens=target.loss_chunk_tokens,
                                  num_docs=num_docs, plan=target.plan, on_phase=on_phase, method=target.method)
    except ValueError as e:
        raise fail(str(e))
    if as_json:
        out = trace_json(target.name, target.gpu, seq_len, prec, layout, analytic, result)
        print(json.dumps({**out, **method_json(target.model, target.method)}, indent=2))
        return
    console.print(f"[bold]{escape(target.name)}[/] ({params_phrase(target.model)}) at {seq_len:,} tokens, "
                  f"{prec}, on {target.gpu.display_name}: {layout_line(layout)}")
    console.print(method_line(target.model, target.method, prec), highlight=False)
    console.print(f"traced one step of {layout.micro_batch_size} x {result.tokens_per_rank:,} tokens per rank "
                  f"({result.num_docs} documents per sequence) in {result.trace_s:.1f} s, "
                  f"{result.max_rss_bytes / 1e9:.2f} GB resident")
    console.print(trace_table(result, analytic, layout.recompute))
    for note in result.corrections:
        console.print(f"[dim]- {note}[/]")


# ---------------------------------------------------------------- report


def _ratio(measured, predicted) -> str:
    """"xR" (measured / predicted) when the plan predicted it, else ""."""
    return "" if not predicted or measured is None else f"x{measured / predicted:.2f}"


def _print_report(r) -> None:
    """The text form of a RunReport."""
    steps = f"{r.steps_logged} steps logged ({r.first_step}..{r.last_step}"
    steps += f" of {r.planned_steps})" if r.planned_steps else ")"
    console.print(f"[bold]{escape(r.model)}[/] at {r.seq_len:,} tokens on {r.num_gpus} x {escape(r.gpu)}: {steps}",
                  highlight=False)
    real = f" ({r.loss_tokens:,} real target tokens)" if r.loss_tokens is not None else ""
    console.print(f"tokens: {r.tokens:,} ({r.tokens_per_step:,} per step){real}; "
                  f"loss {r.first_loss:.4f} -> {r.last_loss:.4f}", highlight=False)
    table = Table(title="measured vs predicted (steady steps: after the first logged step)")
    for col in ("", "measured", "predicted", "measured / predicted"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row("tokens/s/GPU", f"{r.tokens_per_s_per_gpu:,.0f}",
                  "-" if r.predicted_tokens_per_s_per_gpu is None else f"{r.predicted_tokens_per_s_per_gpu:,.0f}",
                  _ratio(r.tokens_per_s_per_gpu, r.predicted_tokens_per_s_per_gpu) or "-")
    table.add_row("MFU", "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
                  "-" if r.predicted_mfu is None else f"{100 * r.predicted_mfu:.1f}%", _ratio(r.mfu, r.predicted_mfu) or "-")
    t = r.time
    table.add_row("step time (s)", "-" if t.steady_step_s is None else f"{t.steady_step_s:.3f}",
                  "-" if t.predicted_step_s is None else f"{t.predicted_step_s:.3f}",
                  _ratio(t.steady_step_s, t.predicted_step_s) or "-")
    for row in r.memory:
        predicted = "-" if row.predicted_bytes is None else gib(row.predicted_bytes)
        table.add_row(f"{row.name.removesuffix('_bytes').replace('_', ' ')} GiB (max over ranks)", gib(row.measured_bytes),
                      predicted, _ratio(row.measured_bytes, row.predicted_bytes) or "-")
        if len(row.per_rank_bytes) > 1:
            for rank, value in enumerate(row.per_rank_bytes):
                table.add_row(f"  rank {rank}", gib(value), predicted, _ratio(value, row.predicted_bytes) or "-")
    console.print(table)
    where = [f"{t.step_s:,.1f} s in steps (first step {t.first_step_s:,.2f} s"
             + ("" if t.steady_step_s is None else f", then {t.steady_step_s:,.3f} s each") + ")"]
    if t.wall_s is not None:
        where.append(f"{t.outside_steps_s:,.1f} s outside them (checkpoints, logging) of {t.wall_s:,.1f} s")
    if t.predicted_compute_s is not None:
        where.append(f"plan: {t.predicted_compute_s:.3f} s compute + {t.predicted_exposed_comm_s:.3f} s exposed "
                     f"communication per step")
    console.print("time: " + "; ".join(where), highlight=False, soft_wrap=True)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (its plan.yaml and metrics.jsonl).")],
    as_json: JsonOpt = False,
    png: Annotated[Optional[str], typer.Option("--png", help="Also draw the loss and the measured vs predicted "
                                               "peak memory to this .png (or .svg) file (needs matplotlib).")] = None,
) -> None:
    """Summarise a run: steps, tokens, tokens/s and MFU, peak memory per rank, against the plan."""
    from .charts import ChartError
    from .report import ReportError, report_run

    try:
        fmt = _chart_format(png, "--png") if png is not None else None
        result = report_run(run_dir)
    except (ReportError, ChartError) as e:
        raise fail(_one_line(e), 2)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_report(result)
    if png is not None:
        from .charts import report_chart

        _draw(report_chart, result, path=png, quiet=as_json, fmt=fmt)


# ---------------------------------------------------------------- models, gpus


def _print_table(table: Table) -> None:
    """A listing: wrapped to the terminal, else (a pipe, a file) at its full width, nothing cut."""
    if console.is_terminal:
        console.print(table)
    else:
        _Console(emoji=False, width=10_000).print(table)


@app.command()
def models() -> None:
    """List the model profiles (--model also takes a config.json path or a size like 7b)."""
    table = Table(title="model profiles")
    profiles = [(name, load_model(name)) for name in model_names()]
    moe = any(m.is_moe for _, m in profiles)  # the active column only where a mixture-of-experts profile is listed
    for col in ("name", "params", *(("active (top-k of experts)",) if moe else ()), "layers", "hidden", "heads/kv",
                "ffn", "vocab", "tied"):
        table.add_column(col, justify="right" if col != "name" else "left")
    for name, m in profiles:
        active = f"{m.active_params() / 1e9:.2f}B ({m.num_experts_per_tok} of {m.num_experts})" if m.is_moe else "all"
        table.add_row(
            name,
            f"{m.num_params() / 1e9:.2f}B",
            *((active,) if moe else ()),
            str(m.num_layers),
            str(m.hidden_size),
            f"{m.num_attention_heads}/{m.num_kv_heads}",
            str(m.intermediate_size),
            str(m.vocab_size),
            "yes" if m.tie_word_embeddings else "no",
        )
    _print_table(table)


@app.command()
def gpus(
    show_all: Annotated[bool, typer.Option("--all", help="Also list the cpu test target (one process is one device).")] = False,
) -> None:
    """List the GPU profiles (memory as the CUDA runtime reports it)."""
    from .planner.schema import CPU_TARGET

    table = Table(title="GPU profiles")
    for col in ("name", "device", "memory GiB", "bf16 TFLOPS", "fp16 TFLOPS", "fp32 TFLOPS", "HBM TB/s", "per node"):
        table.add_column(col, justify="left" if col in ("name", "device") else "right",
                         no_wrap=col == "name")
    for name in gpu_names():
        if name == CPU_TARGET and not show_all:
            continue
        g = load_gpu(name)
        table.add_row(
            name,
            g.display_name,
            gib(g.hbm_bytes),
            f"{g.bf16_tflops:g}" if g.supports_bf16 else "-",
            f"{g.fp16_tflops:g}",
            f"{g.fp32_tflops:g}",
            f"{g.hbm_bandwidth_bytes_per_s / 1e12:.2f}",
            str(g.gpus_per_node),
        )
    _print_table(table)


@app.command()
def schema() -> None:
    """Print the JSON Schema of plan.yaml."""
    print(json.dumps(Plan.model_json_schema(), indent=2))
