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

from .profiles import GIB, ProfileError, gpu_names, load_gpu, load_model, model_names

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Plan, check and launch long-context LLM fine-tuning jobs.",
)
console = Console()
err_console = Console(stderr=True)


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
