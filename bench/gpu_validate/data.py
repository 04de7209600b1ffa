"""The generated training text and the run folders the trainer reads (written by the orchestrator)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from ltune.planner.schema import Hardware, ModelSpec, Plan, Training

from bench.gpu_validate.common import REPO, TOKENIZER_DIR
from bench.gpu_validate.configs import Config

WORDS = (
    "the a small red quiet quick old green brave sleepy happy tall cat dog fox owl hen goat duck bee frog "
    "mole barn river hill garden forest lake market saw found followed fed helped chased met called and "
    "they became friends it ran away was home went near Ada Ben Cleo Dan Eve Finn Gus Hana Ivo June"
).split()


def tokens_per_word(tok, rng: random.Random, sample_words: int = 4000) -> float:
    """Tokens per WORDS word, measured with the tokenizer on a random sample."""
    sample = " ".join(rng.choice(WORDS) for _ in range(sample_words))
    return len(tok.encode(sample).ids) / sample_words


def write_data(folder: Path, num_docs: int, doc_tokens: int, seed: int = 0) -> dict:
    """JSONL of ``num_docs`` long text documents of about ``doc_tokens`` tokens each (measured
    with the tokenizer), so that a packed sequence is one document piece: full causal attention."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    rng = random.Random(seed)
    words = int(doc_tokens / tokens_per_word(tok, rng)) + 1
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "docs.jsonl"
    counts = []
    with path.open("w") as f:
        for _ in range(num_docs):
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            counts.append(len(tok.encode(text).ids))
            f.write(json.dumps({"text": text}) + "\n")
    return {"path": str(path), "num_docs": num_docs, "tokens_per_doc_min": min(counts), "tokens_total": sum(counts)}


def make_plan(cfg: Config, gpu_name: str, data_dir: Path, run_dir: Path, steps: int) -> Plan:
    """The plan of one configuration: random init, lr 1e-4, no warmup, ``steps`` steps, no checkpoints."""
    return Plan(
        model=ModelSpec(name=cfg.model.name, architecture=cfg.model, tokenizer=str(TOKENIZER_DIR)),
        hardware=Hardware(gpu=gpu_name),
        layout=cfg.layout(),
        training=Training(
            seq_len=cfg.seq_len, learning_rate=1e-4, warmup_steps=0, max_steps=steps, data=[str(data_dir)],
            output_dir=str(run_dir), seed=0, checkpoint_every=0, log_every=1, loss_chunk_tokens=cfg.loss_chunk_tokens,
        ),
    )


def free_port() -> int:
    """A free TCP port for the process group's MASTER_PORT."""
    from ltune.launcher.ports import free_port as _free

    return _free()


def write_run_dir(plan: Plan, run_dir: Path) -> dict:
    """The run folder exactly as ``ltune launch --launcher torchrun`` writes it (plan.yaml,
    ds_config.json, command.json); returns the environment the launch would add."""
    from ltune.launcher import LaunchOptions, plan_launch, write_spec

    if run_dir.exists():
        shutil.rmtree(run_dir)
    spec = plan_launch(
        plan, run_dir.parent / "plan.yaml",
        LaunchOptions(launcher="torchrun", run_dir=str(run_dir), force=True, master_port=free_port()),
        cwd=REPO,
    )
    write_spec(spec)
    return dict(spec.env)
