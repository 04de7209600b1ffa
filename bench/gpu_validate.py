"""One GPU, one call: ltune's trainer and planner against what a real GPU measures.

Run by bench/gpu_validate.sh on a lent H100/H200 (see the exact device call there), or here
with ``--cpu-smoke`` (tiny sizes, CPU, gloo) to exercise every code path but the CUDA-only calls.

Phases (each beside the planner's prediction; results.json is rewritten after each one, so a
run cut short still returns what it measured):

- ``ctx``  (issue 5): the CUDA context of a fresh process -- device memory used after
  ``torch.cuda.init()`` (``torch.cuda.mem_get_info``) and after the first cuBLAS matmul and
  varlen-attention call, beside nvidia-smi's figure -- for the planner's ``cuda_context`` term.
- ``a``    (issue 3): the real trainer (``ltune.trainer.Trainer``, one process, NCCL world of 1),
  a random-init ~1B llama shape at 8k and 32k tokens, ZeRO-3, bf16, full recompute; peak
  max_memory_allocated / max_memory_reserved and tokens/s/GPU from its metrics.jsonl beside
  ``check_fit(plan)``. The only change to the trainer: the end-of-run checkpoint and HF export
  are skipped (17 GB of optimizer state to disk would eat the call), see ``cmd_train``.
- ``c``    (issue 5): a matrix of single-GPU configurations (qwen2.5-0.5b and the 1B shape,
  2k-16k, recompute on/off, loss full/chunked, ZeRO-0/3), two trainer steps each in one
  process, peaks beside the planner's analytic terms (``estimate_memory``) and the CPU trace
  (``ltune.trace``, precomputed here into bench/gpu_validate_trace.json).
- ``b``    (issue 4): the longest context that trains for the 1B shape on this GPU, with
  ltune's trainer (full recompute, chunked loss) and with transformers' defaults, each
  searched by doubling then bisecting, under a time budget, catching OutOfMemoryError; the
  planner's predicted longest context for both beside.

"transformers' defaults", our choice: the same DeepSpeed ZeRO-3 engine, ds_config and AdamW as
ltune (so model states are identical and only activations and loss differ), around a plain
``AutoModelForCausalLM`` with ``attn_implementation="sdpa"``, no gradient checkpointing (the
Trainer default), called as ``model(input_ids=..., labels=...)`` (transformers' ForCausalLMLoss:
full logits, upcast to fp32), one unpacked sequence of seq_len tokens, ``use_cache=False``.
The planner's layout for it: recompute "none", loss "full", attention "varlen" (sdpa's flash
kernel saves what flash-attn varlen saves).

Every GPU process is a subprocess; the orchestrator never touches CUDA (its own context would
count in every measurement).

Usage: python bench/gpu_validate.py --out DIR [--budget-s 450] [--cpu-smoke] [--only ctx,a,c,b]
       python bench/gpu_validate.py --write-trace   (here: precompute bench/gpu_validate_trace.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ltune.planner.memory import estimate_memory  # noqa: E402
from ltune.planner.schema import Hardware, Layout, ModelSpec, Plan, Training  # noqa: E402
from ltune.profiles import GIB, load_gpu, resolve_model  # noqa: E402
from ltune.profiles.schema import GpuProfile, ModelProfile  # noqa: E402

TOKENIZER_DIR = REPO / "examples" / "tiny-cpu" / "tokenizer"
TRACE_FILE = REPO / "bench" / "gpu_validate_trace.json"
MIB = 2**20
EXIT_OOM = 3
RESULT_FILE = "gv_result.json"
RESERVE_TERMS = ("cuda_context", "comm_buffers", "fragmentation")

# The "~1B" llama shape of the issues: 0.85B parameters (TinyLlama-1.1B's widths -- hidden 2048,
# 32 heads, 8 kv heads, ffn 5632 -- with 16 layers instead of 22; Llama-2's vocabulary of 32000).
MODEL_1B = ModelProfile(
    name="llama-1b-bench",
    source="bench/gpu_validate.py: TinyLlama-1.1B widths (2048/32 heads/8 kv/5632), 16 layers, vocab 32000",
    family="llama",
    hidden_size=2048,
    num_layers=16,
    num_attention_heads=32,
    num_kv_heads=8,
    intermediate_size=5632,
    vocab_size=32000,
    max_position_embeddings=1 << 20,
    generic=True,
)
MODEL_TINY = ModelProfile(
    name="tiny-smoke",
    source="bench/gpu_validate.py --cpu-smoke",
    family="llama",
    hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    vocab_size=512,
    max_position_embeddings=1 << 16,
    generic=True,
)
MODEL_TINY_QWEN = MODEL_TINY.model_copy(
    update={"name": "tiny-smoke-qwen", "family": "qwen2", "attention_bias": True, "tie_word_embeddings": True, "vocab_size": 640}
)


@dataclass(frozen=True)
class Config:
    """One single-GPU training configuration."""

    model: ModelProfile
    seq_len: int
    zero_stage: int = 3
    recompute: str = "full"
    loss: str = "full"
    attention: str = "varlen"
    micro_batch_size: int = 1
    chunk_tokens: int = 4096

    @property
    def key(self) -> str:
        return (
            f"{self.model.name}|ctx={self.seq_len}|z={self.zero_stage}|rc={self.recompute}|loss={self.loss}"
            f"|attn={self.attention}|mb={self.micro_batch_size}|chunk={self.chunk_tokens}"
        )

    @property
    def label(self) -> str:
        ctx = f"{self.seq_len // 1024}k" if self.seq_len % 1024 == 0 else str(self.seq_len)
        return f"{self.model.name} {ctx} z{self.zero_stage} rc={self.recompute} loss={self.loss}"

    def layout(self) -> Layout:
        return Layout(
            num_gpus=1, zero_stage=self.zero_stage, recompute=self.recompute, loss=self.loss,
            attention=self.attention, micro_batch_size=self.micro_batch_size,
        )


@dataclass
class Setup:
    """Sizes of a run: the GPU one, or the CPU smoke one."""

    smoke: bool
    model: ModelProfile
    a_seq_lens: tuple[int, ...]
    a_steps: tuple[int, ...]
    matrix: list[Config]
    matrix_steps: int
    search_start: int
    search_granularity: int
    search_bisections: int
    search_steps: int
    search_max: int
    doc_tokens: int  # tokens per generated document: the first sequences are whole pieces of one document
    num_docs: int
    fake_oom_tokens: dict[str, int] = field(default_factory=dict)  # smoke only: "ltune"/"hf" -> cap


def gpu_setup() -> Setup:
    m, q = MODEL_1B, resolve_model("qwen2.5-0.5b")
    matrix = [
        Config(q, 2048, zero_stage=0, recompute="none", loss="full"),
        Config(q, 4096, zero_stage=0, recompute="full", loss="chunked"),
        Config(q, 8192, zero_stage=3, recompute="full", loss="full"),
        Config(q, 16384, zero_stage=3, recompute="full", loss="chunked"),
        Config(m, 2048, zero_stage=3, recompute="none", loss="full"),
        Config(m, 4096, zero_stage=0, recompute="none", loss="chunked"),
        Config(m, 8192, zero_stage=0, recompute="full", loss="full"),
        Config(m, 16384, zero_stage=3, recompute="full", loss="chunked"),
    ]
    return Setup(
        smoke=False, model=m, a_seq_lens=(8192, 32768), a_steps=(5, 4), matrix=matrix, matrix_steps=2,
        search_start=8192, search_granularity=4096, search_bisections=2, search_steps=1,
        search_max=1 << 21, doc_tokens=600_000, num_docs=3,
    )


def smoke_setup() -> Setup:
    m, q = MODEL_TINY, MODEL_TINY_QWEN
    matrix = [
        Config(q, 256, zero_stage=0, recompute="none", loss="full"),
        Config(q, 512, zero_stage=3, recompute="full", loss="chunked", chunk_tokens=128),
        Config(m, 256, zero_stage=3, recompute="none", loss="full"),
    ]
    return Setup(
        smoke=True, model=m, a_seq_lens=(256, 512), a_steps=(2, 2), matrix=matrix, matrix_steps=2,
        search_start=256, search_granularity=128, search_bisections=1, search_steps=1,
        search_max=1 << 14, doc_tokens=2_500, num_docs=4,
        fake_oom_tokens={"ltune": 1500, "hf": 700},
    )


# ---------------------------------------------------------------- planner side (pure)


def gpu_profile_for(device_name: str | None, total_bytes: int | None, smoke: bool) -> tuple[GpuProfile, str]:
    """The ltune GPU profile of the device (by its CUDA name), and a note on the match."""
    if smoke or not device_name:
        return load_gpu("cpu"), "cpu smoke"
    name = device_name.upper()
    if "H200" in name:
        profile = "h200"
    elif "H100" in name and "PCIE" in name:
        profile = "h100-pcie"
    elif "H100" in name:
        profile = "h100-80g"
    elif "A100" in name and "80" in name:
        profile = "a100-80g"
    else:
        profile = "h100-80g"
    gpu = load_gpu(profile)
    note = f"{device_name} -> profile {profile}"
    if total_bytes and abs(total_bytes - gpu.hbm_bytes) > 0.01 * gpu.hbm_bytes:
        note += f" (CUDA total {total_bytes / GIB:.2f} GiB vs profile {gpu.hbm_bytes / GIB:.2f} GiB)"
    return gpu, note


def prediction(cfg: Config, gpu: GpuProfile, safety_margin: float | None = None) -> dict:
    """The planner's analytic breakdown of one configuration, keyed for comparison.

    allocated: the terms that are tensors (all but cuda_context, comm_buffers, fragmentation),
    to set beside max_memory_allocated; reserved: allocated + fragmentation, beside
    max_memory_reserved; total_bytes: everything, beside the device's used memory.
    """
    from ltune.planner.memory import Shape
    from ltune.planner.throughput import estimate_throughput

    kwargs = {} if safety_margin is None else {"safety_margin": safety_margin}
    mem = estimate_memory(cfg.model, gpu, cfg.layout(), cfg.seq_len, chunk_tokens=cfg.chunk_tokens, **kwargs)
    tensors = sum(v for k, v in mem.terms.items() if k not in RESERVE_TERMS)
    tp = estimate_throughput(Shape.of(cfg.model, cfg.seq_len, "bf16", cfg.chunk_tokens), cfg.layout(), gpu)
    return {
        "terms": dict(mem.terms),
        "peak_phase": mem.peak_phase,
        "allocated_bytes": tensors,
        "reserved_bytes": tensors + mem.terms.get("fragmentation", 0),
        "total_bytes": mem.total_bytes,
        "usable_bytes": mem.usable_bytes,
        "fits": mem.fits_gpu,
        "step_time_s": tp.step_time_s,
        "tokens_per_s_per_gpu": tp.tokens_per_s_per_gpu,
        "mfu": tp.mfu,
    }


def predicted_longest(model: ModelProfile, gpu: GpuProfile, layout: Layout, *, safety_margin: float,
                      granularity: int = 1024, upper: int = 1 << 24, chunk_tokens: int = 4096) -> int:
    """The longest seq_len (a multiple of granularity) the planner says fits; 0 when none does."""

    def fits(n: int) -> bool:
        return estimate_memory(model, gpu, layout, n, chunk_tokens=chunk_tokens, safety_margin=safety_margin).fits_gpu

    lo, hi = 0, upper // granularity + 1  # fits(lo * g) assumed (0 tokens), fits(hi * g) false
    if fits(upper):
        return upper
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid * granularity):
            lo = mid
        else:
            hi = mid
    return lo * granularity


# ---------------------------------------------------------------- the longest-context search (pure)


def search_longest(run_batch, *, start: int, granularity: int, bisections: int, known_ok: int = 0,
                   upper: int, time_left, estimate_s, overhead_s) -> dict:
    """Doubling from ``start`` until a context fails, then ``bisections`` midpoints.

    run_batch(contexts) runs ascending contexts in one process, which stops at the first that
    fails, and returns [(n, outcome)] for those it tried: outcome "ok", "oom", "timeout" or an
    error. The doubling contexts go in one batch, as many as the time left allows (overhead_s
    per process plus estimate_s(n) per context); each midpoint is a batch of its own. Contexts
    at or below ``known_ok`` (shown to train elsewhere) are not tried again.
    """
    lo, hi, probes, stopped = known_ok, None, [], None
    batch, need, n = [], overhead_s(), start
    while n <= upper:
        if n > lo:
            need += estimate_s(n)
            if need > time_left():
                stopped = f"budget: doubling stopped before {n} (~{need:.0f} s needed, {time_left():.0f} s left)"
                break
            batch.append(n)
        n *= 2
    tried = run_batch(batch) if batch else []
    probes.extend({"seq_len": m, "outcome": o} for m, o in tried)
    for m, outcome in tried:
        if outcome == "ok":
            lo = max(lo, m)
        elif outcome == "oom":
            hi = m
            stopped = None  # the doubling found its limit
        else:
            stopped = f"{outcome} at {m}"
    for _ in range(bisections):
        if hi is None:
            break
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo or mid >= hi:
            break
        need = overhead_s() + estimate_s(mid)
        if need > time_left():
            stopped = f"budget: bisection at {mid} needs ~{need:.0f} s, {time_left():.0f} s left"
            break
        tried = run_batch([mid])
        probes.extend({"seq_len": m, "outcome": o} for m, o in tried)
        outcome = tried[0][1] if tried else "not run"
        if outcome == "ok":
            lo = mid
        elif outcome == "oom":
            hi = mid
        else:
            stopped = f"{outcome} at {mid}"
            break
    return {"longest_ok": lo, "first_oom": hi, "probes": probes, "stopped": stopped}


# ---------------------------------------------------------------- data and run folders


WORDS = (
    "the a small red quiet quick old green brave sleepy happy tall cat dog fox owl hen goat duck bee frog "
    "mole barn river hill garden forest lake market saw found followed fed helped chased met called and "
    "they became friends it ran away was home went near Ada Ben Cleo Dan Eve Finn Gus Hana Ivo June"
).split()


def write_data(folder: Path, num_docs: int, doc_tokens: int, seed: int = 0) -> dict:
    """JSONL of ``num_docs`` long text documents of about ``doc_tokens`` tokens each (measured
    with the tokenizer), so that a packed sequence is one document piece: full causal attention."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    rng = random.Random(seed)
    sample = " ".join(rng.choice(WORDS) for _ in range(4000))
    per_word = len(tok.encode(sample).ids) / 4000
    words = int(doc_tokens / per_word) + 1
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
    return Plan(
        model=ModelSpec(name=cfg.model.name, architecture=cfg.model, tokenizer=str(TOKENIZER_DIR)),
        hardware=Hardware(gpu=gpu_name),
        layout=cfg.layout(),
        training=Training(
            seq_len=cfg.seq_len, learning_rate=1e-4, warmup_steps=0, max_steps=steps, data=[str(data_dir)],
            output_dir=str(run_dir), seed=0, checkpoint_every=0, log_every=1, loss_chunk_tokens=cfg.chunk_tokens,
        ),
    )


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


def free_port() -> int:
    from ltune.launcher.ports import free_port as _free

    return _free()


# ---------------------------------------------------------------- subprocesses (GPU side)


def _single_rank_env() -> None:
    import warnings

    # DeepSpeed 0.19 calls collectives that newer torch marks deprecated, once per call
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def cuda_memory() -> dict:
    """This process's CUDA allocator peaks and the device's used memory (empty on CPU)."""
    import torch

    if not torch.cuda.is_available():
        import resource

        return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()
    return {
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
        "allocated_bytes": torch.cuda.memory_allocated(),
        "reserved_bytes": torch.cuda.memory_reserved(),
        "device_used_bytes": total - free,
        "device_total_bytes": total,
        "alloc_retries": stats.get("num_alloc_retries", 0),
        "num_ooms": stats.get("num_ooms", 0),
    }


def _fake_oom_check(seq_len: int) -> None:
    """--cpu-smoke: a context above GV_FAKE_OOM_TOKENS raises the OOM a GPU would."""
    cap = os.environ.get("GV_FAKE_OOM_TOKENS")
    if cap and seq_len > int(cap):
        import torch

        raise torch.OutOfMemoryError(f"fake OOM (--cpu-smoke): seq_len {seq_len} > {cap}")


def _write_result(run_dir: Path, result: dict) -> None:
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=1))


def cmd_train(run_dir: str) -> int:
    """``python -m ltune.trainer RUN_DIR`` with the end-of-run checkpoint and export skipped.

    Everything else is the trainer's own code: read_run_dir, check_inputs, join_process_group,
    prepare_data, build_engine, the steps and their metrics.jsonl. An OutOfMemoryError exits
    with EXIT_OOM and the peaks reached.
    """
    _single_rank_env()
    import torch

    import ltune.trainer.__main__ as trainer_main
    from ltune.trainer.loop import Trainer

    Trainer.save_checkpoint = lambda self: None
    Trainer.export = lambda self: None
    real_step = Trainer.train_step

    def train_step(self, batches):
        _fake_oom_check(self.plan.training.seq_len)
        return real_step(self, batches)

    Trainer.train_step = train_step
    folder = Path(run_dir)
    start = time.perf_counter()
    try:
        rc = trainer_main.main([run_dir])
    except torch.OutOfMemoryError as e:
        _write_result(folder, {"oom": True, "error": str(e).splitlines()[0][:400], "wall_s": time.perf_counter() - start, **cuda_memory()})
        return EXIT_OOM
    _write_result(folder, {"oom": False, "rc": rc, "wall_s": time.perf_counter() - start, **cuda_memory()})
    return rc


class _HfProbe:
    """transformers' defaults (see the module docstring) inside ltune's DeepSpeed engine."""

    def __init__(self, run_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM

        from ltune.trainer import engine as engine_lib
        from ltune.trainer import model as model_lib

        plan, ds_config = _read_run_dir(run_dir)
        engine_lib.init_distributed()
        self.device = engine_lib.device()
        config = model_lib.hf_config(plan, "sdpa")
        torch.manual_seed(plan.training.seed)
        if plan.layout.zero_stage == 3:
            lm = model_lib._build_zero3(plan, config, ds_config)
        else:
            lm = AutoModelForCausalLM.from_config(config)
        lm.train()
        self.engine = engine_lib.initialize(plan, ds_config, lm, 1000)

    def run(self, run_dir: Path) -> list[dict]:
        import torch

        plan, _ = _read_run_dir(run_dir)
        seq_len, micro = plan.training.seq_len, plan.layout.micro_batch_size
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 512, (micro, seq_len), generator=gen).to(self.device)
        records = []
        for step in range(plan.training.max_steps or 1):
            _fake_oom_check(seq_len)
            _sync()
            t0 = time.perf_counter()
            out = self.engine(input_ids=ids, labels=ids, use_cache=False)
            self.engine.backward(out.loss)
            self.engine.step()
            loss = float(out.loss.detach())
            del out
            _sync()
            dt = time.perf_counter() - t0
            records.append({"step": step + 1, "loss": loss, "step_time_s": dt, "tokens_per_s_per_gpu": seq_len * micro / dt})
        return records


class _LtuneProbe:
    """ltune's trainer, its engine built once and reused for every context of the batch
    (the engine -- model, optimizer, ZeRO-3 partitions -- does not depend on seq_len; each
    context gets its own Trainer: run folder, plan, data, batches, train_step)."""

    def __init__(self, run_dir: Path):
        from ltune.trainer.loop import Trainer

        self.first = self._trainer(run_dir)
        self.first.build_engine()
        self.Trainer = Trainer

    @staticmethod
    def _trainer(run_dir: Path):
        from ltune.trainer.loop import Trainer

        t = Trainer(run_dir)
        t.read_run_dir()
        t.check_inputs()
        t.join_process_group()
        t.prepare_data()
        return t

    def run(self, run_dir: Path) -> list[dict]:
        from ltune.trainer.metrics import flops_per_token, predicted

        t = self._trainer(run_dir)
        for name in ("engine", "grad_divisor", "peak_flops"):
            setattr(t, name, getattr(self.first, name))
        t.flops_per_token = flops_per_token(t.plan.model.architecture, t.plan.training.seq_len)
        t.prediction = predicted(t.plan)
        records = []
        for _ in range(t.total_steps):
            _fake_oom_check(t.plan.training.seq_len)
            r = t.train_step(t.next_batches())
            records.append({k: r[k] for k in ("step", "loss", "step_time_s", "tokens_per_s_per_gpu", "mfu")})
        return records


def _read_run_dir(run_dir: Path):
    from ltune.planner.io import load_plan
    from ltune.trainer.paths import resolve_plan_paths

    plan = resolve_plan_paths(load_plan(run_dir / "plan.yaml"), run_dir)
    return plan, json.loads((run_dir / "ds_config.json").read_text())


def cmd_probe(kind: str, run_dirs: list[str]) -> int:
    """(b): ascending contexts in one process, one engine; stops at the first that fails.

    Writes RESULT_FILE into each run folder it tried: outcome, step records, peaks (reset
    and the allocator emptied before each context). Exit 0 all ok, EXIT_OOM at an OOM, 1 on
    another error.
    """
    _single_rank_env()
    import gc

    import torch

    cuda = torch.cuda.is_available()
    probe = None
    for name in run_dirs:
        folder = Path(name)
        t0 = time.perf_counter()
        result: dict = {}
        try:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            if probe is None:
                probe = (_HfProbe if kind == "hf" else _LtuneProbe)(folder)
                result["after_init"] = cuda_memory()
            result["steps"] = probe.run(folder)
            result["outcome"] = "ok"
        except torch.OutOfMemoryError as e:
            result.update(outcome="oom", error=str(e).splitlines()[0][:400])
        except Exception as e:  # noqa: BLE001 - recorded for the search, which stops there
            import traceback

            traceback.print_exc()
            result.update(outcome="error", error=f"{type(e).__name__}: {e}"[:400])
        result.update(cuda_memory())
        result["wall_s"] = round(time.perf_counter() - t0, 2)
        _write_result(folder, result)
        print(f"probe {kind}: {name}: {result['outcome']} ({result['wall_s']:.1f} s)", flush=True)
        if result["outcome"] != "ok":
            return EXIT_OOM if result["outcome"] == "oom" else 1
    return 0


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def nvidia_smi(query: str) -> list[str] | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else None


def cmd_ctx(out_file: str) -> int:
    """The CUDA context of this fresh process, step by step (device used memory)."""
    import torch

    result: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "pid": os.getpid(),
                    "module_loading": os.environ.get("CUDA_MODULE_LOADING", "(default: lazy)")}
    smi_before = nvidia_smi("gpu=memory.used,memory.total,name,driver_version")
    result["nvidia_smi_before"] = smi_before
    if not torch.cuda.is_available():
        result["skipped"] = "no CUDA"
        Path(out_file).write_text(json.dumps(result, indent=1))
        return 0
    torch.cuda.init()
    torch.cuda.set_device(0)
    free, total = torch.cuda.mem_get_info()
    props = torch.cuda.get_device_properties(0)
    result.update(device_name=props.name, total_bytes=total, sm_count=props.multi_processor_count)
    stages = {"after_init": total - free}
    x = torch.ones(1, device="cuda")
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    stages["after_first_tensor"] = total - free
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    stages["after_bf16_matmul"] = total - free
    try:
        from ltune.trainer.attention import varlen_attention

        q = torch.randn(4096, 32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(4096, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cu = torch.tensor([0, 1024, 4096], device="cuda", dtype=torch.int32)
        varlen_attention(q, k, k, cu, 3072).sum().backward()
        torch.cuda.synchronize()
        free, _ = torch.cuda.mem_get_info()
        stages["after_varlen_attention_fwd_bwd"] = total - free
    except Exception as e:  # noqa: BLE001 - a measurement, not a test
        result["varlen_error"] = f"{type(e).__name__}: {e}"[:300]
    result["reserved_bytes"] = torch.cuda.memory_reserved()
    result["allocated_bytes"] = torch.cuda.memory_allocated()
    result["used_bytes"] = stages
    # what nvidia-smi says this process uses (device-level, context included)
    apps = nvidia_smi("compute-apps=pid,used_memory") or []
    mine = [line for line in apps if line.split(",")[0].strip() == str(os.getpid())]
    result["nvidia_smi_process_mib"] = int(mine[0].split(",")[1]) if mine else None
    result["nvidia_smi_after"] = nvidia_smi("gpu=memory.used")
    before_mib = int(smi_before[0].split(",")[0]) if smi_before else None
    result["used_before_process_mib"] = before_mib
    # context = device memory in use less what the allocator holds
    result["context_bytes"] = stages["after_bf16_matmul"] - result["reserved_bytes"] - (
        before_mib * MIB if before_mib is not None else 0)
    if "after_varlen_attention_fwd_bwd" in stages:
        result["context_with_attention_bytes"] = stages["after_varlen_attention_fwd_bwd"] - torch.cuda.memory_reserved() - (
            before_mib * MIB if before_mib is not None else 0)
    del x, a
    Path(out_file).write_text(json.dumps(result, indent=1))
    return 0


def cmd_matrix(spec_file: str, out_file: str) -> int:
    """(c): two trainer steps per run folder, all in this process, peaks per configuration.

    Each configuration uses the trainer's own methods (read_run_dir ... build_engine,
    next_batches, train_step); between configurations the engine is destroyed and the
    allocator emptied; the bytes still allocated before a configuration (``baseline``) are
    recorded and subtracted, so a leak shows instead of inflating the next row.
    """
    _single_rank_env()
    import gc

    import torch

    from ltune.trainer.loop import Trainer

    jobs = json.loads(Path(spec_file).read_text())
    cuda = torch.cuda.is_available()
    with open(out_file, "a") as out:
        for job in jobs:
            row: dict = {"key": job["key"], "run_dir": job["run_dir"]}
            trainer = None
            t0 = time.perf_counter()
            try:
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    row["baseline_allocated_bytes"] = torch.cuda.memory_allocated()
                    row["baseline_reserved_bytes"] = torch.cuda.memory_reserved()
                trainer = Trainer(job["run_dir"])
                trainer.read_run_dir()
                trainer.check_inputs()
                trainer.join_process_group()
                trainer.prepare_data()
                trainer.build_engine()
                row["after_init"] = cuda_memory()
                steps = []
                for _ in range(job["steps"]):
                    _fake_oom_check(trainer.plan.training.seq_len)
                    record = trainer.train_step(trainer.next_batches())
                    steps.append({k: record[k] for k in ("step", "loss", "step_time_s", "tokens_per_s_per_gpu")} | cuda_memory())
                row["steps"] = steps
                row["outcome"] = "ok"
            except torch.OutOfMemoryError as e:
                row["outcome"] = "oom"
                row["error"] = str(e).splitlines()[0][:400]
            except Exception as e:  # noqa: BLE001 - recorded, the next configuration still runs
                row["outcome"] = "error"
                row["error"] = f"{type(e).__name__}: {e}"[:400]
            row.update(cuda_memory())
            row["wall_s"] = time.perf_counter() - t0
            if trainer is not None and getattr(trainer, "engine", None) is not None:
                try:
                    trainer.engine.destroy()
                except Exception as e:  # noqa: BLE001
                    row["destroy_error"] = f"{type(e).__name__}: {e}"[:200]
            del trainer
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                row["residual_allocated_bytes"] = torch.cuda.memory_allocated()
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"matrix: {job['key']}: {row['outcome']} ({row['wall_s']:.1f} s)", flush=True)
    return 0


# ---------------------------------------------------------------- the orchestrator (no CUDA here)


class Runner:
    def __init__(self, args, setup: Setup):
        self.args = args
        self.setup = setup
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or ("/tmp/gv_work" if not setup.smoke else self.out / "work")).resolve()
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        self.deadline = time.monotonic() + args.budget_s
        self.started = time.monotonic()
        self.env = {
            **os.environ,
            "LTUNE_CACHE_DIR": str(self.work / "cache"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        if setup.smoke:
            self.env["DS_ACCELERATOR"] = "cpu"
            self.env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/ltune/torch_extensions"))
        self.results: dict = {
            "schema": "ltune-gpu-validate/1",
            "commit": os.environ.get("LTUNE_COMMIT") or _git_commit(),
            "mode": "cpu-smoke" if setup.smoke else "gpu",
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(),
            "budget_s": args.budget_s,
            "model_1b": setup.model.model_dump(),
            "model_1b_params": setup.model.num_params(),
            "phases": {},
        }
        self.gpu: GpuProfile = load_gpu("cpu")
        self.overhead_s = 30.0 if not setup.smoke else 20.0  # per subprocess, refined as runs finish
        self.step_time_ratio = 2.0  # measured / predicted step time, refined by phase a

    # -------------------------------------------------------- plumbing

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, msg: str) -> None:
        print(f"[gv {time.monotonic() - self.started:6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out / "results.json")

    def subprocess(self, argv: list[str], env: dict, timeout_s: float) -> tuple[int, float]:
        """Run argv (its output into ours), killed at timeout_s; (exit code, wall seconds)."""
        start = time.monotonic()
        proc = subprocess.Popen(argv, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = -9
        return rc, time.monotonic() - start

    def run_dir_for(self, name: str) -> Path:
        return self.work / "runs" / name

    def job_env(self, launch_env: dict, fake_cap: int | None = None) -> dict:
        env = {**self.env, **launch_env, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        if fake_cap is not None:
            env["GV_FAKE_OOM_TOKENS"] = str(fake_cap)
        return env

    def run_training(self, cfg: Config, steps: int, name: str, timeout_s: float) -> dict:
        """The trainer (``_train``: python -m ltune.trainer less the final save) on a fresh run folder."""
        kind = "ltune"
        run_dir = self.run_dir_for(name)
        plan = make_plan(cfg, self.gpu.name, self.data_dir, run_dir, steps)
        launch_env = write_run_dir(plan, run_dir)
        cap = self.setup.fake_oom_tokens.get(kind) if self.setup.smoke else None
        self.log(f"trainer {cfg.label}, {steps} step(s), timeout {timeout_s:.0f} s")
        rc, wall = self.subprocess([sys.executable, str(Path(__file__).resolve()), "_train", str(run_dir)],
                                   self.job_env(launch_env, cap), timeout_s)
        result = {"config": cfg.key, "kind": kind, "rc": rc, "wall_s": round(wall, 1)}
        rf = run_dir / RESULT_FILE
        if rf.is_file():
            result["process"] = json.loads(rf.read_text())
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            result["metrics"] = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if rc == EXIT_OOM:
            result["outcome"] = "oom"
        elif rc == 0:
            result["outcome"] = "ok"
        elif rc == -9:
            result["outcome"] = "timeout"
        else:
            result["outcome"] = f"error rc={rc}"
        step_times = [r["step_time_s"] for r in result.get("metrics", [])]
        if result["outcome"] == "ok" and step_times:
            self.overhead_s = max(5.0, wall - sum(step_times))
        self.log(f"trainer {cfg.label}: {result['outcome']} in {wall:.1f} s")
        return result

    def run_batch(self, kind: str, cfgs: list[Config], steps: int, timeout_s: float) -> list[dict]:
        """``_probe``: ascending contexts in one process (stops at the first failure)."""
        run_dirs = []
        for cfg in cfgs:
            run_dir = self.run_dir_for(f"b-{kind}-{cfg.seq_len}")
            launch_env = write_run_dir(make_plan(cfg, self.gpu.name, self.data_dir, run_dir, steps), run_dir)
            run_dirs.append(run_dir)
        cap = self.setup.fake_oom_tokens.get(kind) if self.setup.smoke else None
        self.log(f"probe {kind}: {[c.seq_len for c in cfgs]}, {steps} step(s) each, timeout {timeout_s:.0f} s")
        rc, wall = self.subprocess([sys.executable, str(Path(__file__).resolve()), "_probe", kind, *map(str, run_dirs)],
                                   self.job_env(launch_env, cap), timeout_s)
        rows = []
        for cfg, run_dir in zip(cfgs, run_dirs):
            rf = run_dir / RESULT_FILE
            if rf.is_file():
                r = json.loads(rf.read_text())
            elif rc == -9:
                r = {"outcome": "timeout"}
            else:
                break  # not reached: the process stopped before it
            r.update(config=cfg.key, seq_len=cfg.seq_len, kind=kind,
                     predicted=prediction(cfg, self.gpu, safety_margin=0.0),
                     measured=_summarise_metrics(r.get("steps", [])))
            rows.append(r)
            if r["outcome"] != "ok":
                break
        ok_time = sum(r.get("wall_s", 0) for r in rows if r.get("outcome") == "ok")
        if rows and all(r.get("outcome") == "ok" for r in rows):
            self.overhead_s = max(5.0, wall - ok_time)
        self.log(f"probe {kind}: " + ", ".join(f"{r['seq_len']}:{r['outcome']}" for r in rows) + f" in {wall:.1f} s (rc {rc})")
        return rows

    # -------------------------------------------------------- phases

    def phase_setup(self) -> None:
        smi = nvidia_smi("gpu=name,memory.total") if not self.setup.smoke else None
        if smi:  # the profile before phase ctx (which refines it from CUDA's own figures)
            name, total_mib = [x.strip() for x in smi[0].split(",")]
            self.gpu, _ = gpu_profile_for(name, int(float(total_mib)) * MIB, False)
            self.results["gpu"], self.results["gpu_profile"] = name, self.gpu.name
        self.data_dir = self.work / "data"
        t0 = time.monotonic()
        self.results["data"] = write_data(self.data_dir, self.setup.num_docs, self.setup.doc_tokens)
        self.results["data"]["write_s"] = round(time.monotonic() - t0, 1)
        from importlib.metadata import PackageNotFoundError, version

        for package in ("torch", "transformers", "deepspeed", "pydantic"):  # no import: no CUDA here
            try:
                self.results[package] = version(package)
            except PackageNotFoundError:
                self.results[package] = None

    def phase_ctx(self) -> None:
        out_file = self.work / "ctx.json"
        rc, wall = self.subprocess([sys.executable, str(Path(__file__).resolve()), "_ctx", str(out_file)], self.env, 120)
        ctx = json.loads(out_file.read_text()) if out_file.is_file() else {"error": f"rc={rc}"}
        ctx["wall_s"] = round(wall, 1)
        self.gpu, note = gpu_profile_for(ctx.get("device_name"), ctx.get("total_bytes"), self.setup.smoke)
        ctx["profile"] = note
        ctx["profile_cuda_context_bytes"] = self.gpu.cuda_context_bytes
        self.results["gpu"] = ctx.get("device_name") or "cpu"
        self.results["gpu_profile"] = self.gpu.name
        self.results["phases"]["ctx"] = ctx

    def phase_a(self) -> None:
        rows = []
        self.results["phases"]["a"] = {"what": "issue 3: ltune trainer, 1 GPU, ZeRO-3 bf16 full recompute", "runs": rows}
        for seq_len, steps in zip(self.setup.a_seq_lens, self.setup.a_steps):
            cfg = Config(self.setup.model, seq_len, zero_stage=3, recompute="full", loss="full")
            pred = prediction(cfg, self.gpu)
            need = self.overhead_s + steps * pred["step_time_s"] * self.step_time_ratio * 1.5 + 30
            if need > self.time_left():
                rows.append({"config": cfg.key, "outcome": "skipped (budget)"})
                continue
            r = self.run_training(cfg, steps, f"a-{seq_len}", min(self.time_left(), max(need * 2, 120)))
            r["label"] = cfg.label
            r["predicted"] = pred
            r["check_fit"] = _check_fit_summary(make_plan(cfg, self.gpu.name, self.data_dir, self.run_dir_for("x"), steps))
            r["measured"] = _summarise_metrics(r.get("metrics", []))
            r["trace"] = self.trace_for(cfg)
            if r["measured"].get("step_time_s") and pred["step_time_s"]:
                self.step_time_ratio = max(0.5, r["measured"]["step_time_s"] / pred["step_time_s"])
                r["measured_over_predicted_step_time"] = round(self.step_time_ratio, 3)
            rows.append(r)
            self.save()

    def phase_c(self) -> None:
        jobs, preds = [], {}
        for i, cfg in enumerate(self.setup.matrix):
            run_dir = self.run_dir_for(f"c-{i}")
            write_run_dir(make_plan(cfg, self.gpu.name, self.data_dir, run_dir, self.setup.matrix_steps), run_dir)
            jobs.append({"key": cfg.key, "run_dir": str(run_dir), "steps": self.setup.matrix_steps})
            preds[cfg.key] = (cfg, prediction(cfg, self.gpu))
        spec, out_file = self.work / "matrix_jobs.json", self.work / "matrix.jsonl"
        spec.write_text(json.dumps(jobs))
        timeout = min(self.time_left() - 30, self.args.matrix_budget_s)
        self.log(f"matrix: {len(jobs)} configurations in one process, timeout {timeout:.0f} s")
        env = self.job_env({}, None)
        rc, wall = self.subprocess([sys.executable, str(Path(__file__).resolve()), "_matrix", str(spec), str(out_file)], env, timeout)
        measured = {}
        if out_file.is_file():
            for line in out_file.read_text().splitlines():
                row = json.loads(line)
                measured[row["key"]] = row
        rows = []
        for key, (cfg, pred) in preds.items():
            m = measured.get(key, {"outcome": "not run" if rc == 0 else f"not run (matrix rc={rc})"})
            rows.append({"config": key, "label": cfg.label, "measured": m, "predicted": pred,
                         "trace": self.trace_for(cfg), "summary": _matrix_summary(m, pred)})
        self.results["phases"]["c"] = {"what": "issue 5: single-GPU memory matrix, trainer steps in one process",
                                       "rc": rc, "wall_s": round(wall, 1), "rows": rows,
                                       "reserved_over_allocated": _ratios(rows)}

    def phase_b(self) -> None:
        m = self.setup.model
        layouts = {
            "hf": lambda n: Config(m, n, zero_stage=3, recompute="none", loss="full"),
            "ltune": lambda n: Config(m, n, zero_stage=3, recompute="full", loss="chunked"),
        }
        phase: dict = {"what": "issue 4: longest context that trains, 1 GPU, ZeRO-3 bf16",
                       "hf_defaults": "DeepSpeed ZeRO-3 engine as ltune's; AutoModelForCausalLM(sdpa), no checkpointing, "
                                      "model(input_ids, labels) (ForCausalLMLoss, full fp32 logits), one unpacked sequence",
                       "steps_per_context": self.setup.search_steps}
        self.results["phases"]["b"] = phase
        for kind, layout_of in layouts.items():
            lay = layout_of(1024).layout()
            phase[f"{kind}_predicted_longest"] = {
                "margin_0": predicted_longest(m, self.gpu, lay, safety_margin=0.0),
                "margin_default": predicted_longest(m, self.gpu, lay, safety_margin=0.05),
            }
        known_ltune = 0  # contexts phase a showed to train (same model, ZeRO-3, full recompute)
        for r in self.results["phases"].get("a", {}).get("runs", []):
            if r.get("outcome") == "ok":
                known_ltune = max(known_ltune, int(r["config"].split("|ctx=")[1].split("|")[0]))
        hf_end = time.monotonic() + min(self.args.hf_search_max_s, self.args.hf_search_share * max(0.0, self.time_left() - 10))
        for kind, layout_of in layouts.items():
            end = hf_end if kind == "hf" else self.deadline - 10
            runs: list[dict] = []

            def run_batch(contexts, kind=kind, layout_of=layout_of, runs=runs, end=end):
                rows = self.run_batch(kind, [layout_of(n) for n in contexts], self.setup.search_steps,
                                      max(30.0, end - time.monotonic() + 30))
                runs.extend(rows)
                self.save()
                return [(r["seq_len"], r["outcome"]) for r in rows]

            def estimate(n: int, layout_of=layout_of) -> float:
                pred = prediction(layout_of(n), self.gpu)
                return self.setup.search_steps * pred["step_time_s"] * self.step_time_ratio * 1.3 + 2

            result = search_longest(
                run_batch, start=self.setup.search_start, granularity=self.setup.search_granularity,
                bisections=self.setup.search_bisections, known_ok=known_ltune if kind == "ltune" else 0,
                upper=self.setup.search_max, time_left=lambda end=end: end - time.monotonic(), estimate_s=estimate,
                overhead_s=lambda: self.overhead_s,
            )
            result["known_ok_from_phase_a"] = known_ltune if kind == "ltune" else 0
            result["runs"] = runs
            phase[kind] = result
            self.save()
        lt, hf = phase["ltune"]["longest_ok"], phase["hf"]["longest_ok"]
        phase["ratio_ltune_over_hf"] = round(lt / hf, 2) if hf else None

    def trace_for(self, cfg: Config) -> dict | None:
        """The CPU trace of a configuration: precomputed (GPU mode) or traced now (smoke)."""
        if self.setup.smoke:
            return trace_config(cfg)
        table = json.loads(TRACE_FILE.read_text()) if TRACE_FILE.is_file() else {}
        return table.get("configs", {}).get(cfg.key)

    # -------------------------------------------------------- all

    def run(self) -> int:
        only = set(self.args.only.split(",")) if self.args.only else {"ctx", "a", "c", "b"}
        self.phase_setup()
        self.save()
        for name in ("ctx", "a", "c", "b"):  # b last: it spends whatever time is left
            if name not in only:
                continue
            if name != "ctx" and self.time_left() < 20:
                self.results["phases"][name] = {"skipped": "budget"}
                continue
            self.log(f"phase {name}")
            try:
                getattr(self, f"phase_{name}")()
            except Exception as e:  # noqa: BLE001 - keep the other phases' numbers
                import traceback

                traceback.print_exc()
                self.results["phases"].setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"[:500]
            self.save()
        self.results["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.save()
        print_table(self.results)
        return 0


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _check_fit_summary(plan: Plan) -> dict:
    from ltune.planner.fit import check_fit

    ev = check_fit(plan)
    return {"fits": ev.fits, "total_bytes": ev.memory.total_bytes, "peak_phase": ev.memory.peak_phase,
            "terms": dict(ev.memory.terms), "tokens_per_s_per_gpu": ev.throughput.tokens_per_s_per_gpu,
            "step_time_s": ev.throughput.step_time_s, "mfu": ev.throughput.mfu}


def _summarise_metrics(records: list[dict]) -> dict:
    """Peaks over all steps; step time and tokens/s as the median of the steps after the first."""
    if not records:
        return {}
    timed = records[1:] if len(records) > 1 else records
    times = sorted(r["step_time_s"] for r in timed)
    tps = sorted(r["tokens_per_s_per_gpu"] for r in timed)
    out = {"steps": len(records), "step_time_s": times[len(times) // 2], "tokens_per_s_per_gpu": tps[len(tps) // 2],
           "losses": [round(r["loss"], 4) for r in records]}
    for key in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_rss_bytes", "device_used_bytes"):
        vals = [r[key] for r in records if key in r]
        if vals:
            out[key] = max(vals)
    for key in ("predicted_peak_bytes", "predicted_tokens_per_s_per_gpu", "mfu"):
        if key in records[-1]:
            out[key] = records[-1][key]
    return out


def _matrix_summary(m: dict, pred: dict) -> dict:
    if m.get("outcome") != "ok":
        return {"outcome": m.get("outcome")}
    base_a = m.get("baseline_allocated_bytes", 0)
    alloc = m.get("peak_allocated_bytes")
    res = m.get("peak_reserved_bytes")
    out = {"outcome": "ok"}
    if alloc is not None:
        alloc -= base_a
        out.update(peak_allocated_bytes=alloc, peak_reserved_bytes=res,
                   allocated_error_pct=round(100 * (pred["allocated_bytes"] - alloc) / alloc, 2),
                   reserved_over_allocated=round(res / alloc, 4) if alloc else None)
    return out


def _ratios(rows: list[dict]) -> dict:
    vals = [r["summary"]["reserved_over_allocated"] for r in rows if r["summary"].get("reserved_over_allocated")]
    if not vals:
        return {}
    return {"min": min(vals), "max": max(vals), "median": sorted(vals)[len(vals) // 2]}


# ---------------------------------------------------------------- traces (CPU, here)


def trace_config(cfg: Config) -> dict:
    from ltune.trace import comparable_totals, trace_memory

    t0 = time.perf_counter()
    res = trace_memory(cfg.model, cfg.seq_len, cfg.layout(), "bf16", loss_chunk_tokens=cfg.chunk_tokens)
    analytic = estimate_memory(cfg.model, load_gpu("h100-80g"), cfg.layout(), cfg.seq_len, chunk_tokens=cfg.chunk_tokens)
    a_total, t_total = comparable_totals(res, analytic.terms)
    return {"peak_bytes": res.peak_bytes, "peak_phase": res.peak_phase, "terms": dict(res.terms),
            "comparable_traced_bytes": t_total, "comparable_analytic_bytes": a_total,
            "untraced_terms": list(res.untraced_terms), "trace_s": round(time.perf_counter() - t0, 1)}


def write_trace_file() -> int:
    setup = gpu_setup()
    cfgs = [Config(setup.model, n, zero_stage=3, recompute="full", loss="full") for n in setup.a_seq_lens] + setup.matrix
    table = {"what": "ltune trace (CPU, fake tensors) of bench/gpu_validate.py's GPU configurations; "
                     "regenerate with: python bench/gpu_validate.py --write-trace",
             "commit": _git_commit(), "configs": {}}
    try:
        import torch

        table["torch"] = torch.__version__
    except ImportError:
        pass
    for cfg in cfgs:
        print(f"trace {cfg.key} ...", flush=True)
        table["configs"][cfg.key] = trace_config(cfg)
        print(f"  peak {table['configs'][cfg.key]['peak_bytes'] / GIB:.2f} GiB in {table['configs'][cfg.key]['trace_s']} s", flush=True)
    TRACE_FILE.write_text(json.dumps(table, indent=1) + "\n")
    return 0


# ---------------------------------------------------------------- the table printed last


def _gib(x) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def print_table(res: dict) -> None:
    ph = res["phases"]
    lines = [f"== ltune gpu_validate: {res.get('gpu')} (profile {res.get('gpu_profile')}), torch {res.get('torch')}, "
             f"commit {str(res.get('commit'))[:12]}, {res.get('elapsed_s')} s"]
    ctx = ph.get("ctx", {})
    if ctx.get("context_bytes") is not None:
        lines.append(f"ctx: CUDA context {ctx['context_bytes'] / MIB:.0f} MiB (with attention "
                     f"{(ctx.get('context_with_attention_bytes') or 0) / MIB:.0f} MiB, nvidia-smi process "
                     f"{ctx.get('nvidia_smi_process_mib')} MiB) vs profile {ctx.get('profile_cuda_context_bytes', 0) / MIB:.0f} MiB")
    else:
        lines.append(f"ctx: {ctx.get('skipped') or ctx.get('error') or 'not run'}")
    lines.append("a: config                         alloc GiB meas/pred   reserved meas/pred   tok/s/GPU meas/pred  trace GiB")
    for r in ph.get("a", {}).get("runs", []):
        if "measured" not in r:
            lines.append(f"a: {r['config']}: {r.get('outcome')}")
            continue
        mm, p = r["measured"], r["predicted"]
        lines.append(
            f"a: {r['label']:<30} {_gib(mm.get('peak_allocated_bytes')):>6}/{_gib(p['allocated_bytes']):<6}      "
            f"{_gib(mm.get('peak_reserved_bytes')):>6}/{_gib(p['reserved_bytes']):<6}      "
            f"{mm.get('tokens_per_s_per_gpu', 0):>7.0f}/{p['tokens_per_s_per_gpu']:<7.0f}    "
            f"{_gib((r.get('trace') or {}).get('comparable_traced_bytes'))}  [{r['outcome']}]"
        )
    lines.append("c: config                                   alloc GiB meas/pred  err%   reserved GiB  res/alloc  trace GiB")
    for r in ph.get("c", {}).get("rows", []):
        s = r["summary"]
        if s.get("outcome") != "ok" or "peak_allocated_bytes" not in s:
            lines.append(f"c: {r['label']:<42} {s.get('outcome')} {r['measured'].get('error', '')[:60]}")
            continue
        lines.append(
            f"c: {r['label']:<42} {_gib(s['peak_allocated_bytes']):>6}/{_gib(r['predicted']['allocated_bytes']):<6} "
            f"{s['allocated_error_pct']:>+6.1f}  {_gib(s['peak_reserved_bytes']):>8}      {s['reserved_over_allocated']:.3f}    "
            f"{_gib((r.get('trace') or {}).get('comparable_traced_bytes'))}"
        )
    b = ph.get("b", {})
    for kind in ("hf", "ltune"):
        if kind in b:
            r = b[kind]
            pl = b.get(f"{kind}_predicted_longest", {})
            lines.append(
                f"b: {kind:<6} longest ok {r['longest_ok']}, first OOM {r['first_oom']}, predicted {pl.get('margin_0')} "
                f"(margin 5%: {pl.get('margin_default')}); probes "
                + ", ".join(f"{p['seq_len']}:{p['outcome']}" for p in r["probes"])
                + (f"; stopped: {r['stopped']}" if r.get("stopped") else "")
            )
    if "ratio_ltune_over_hf" in b:
        lines.append(f"b: ltune/hf longest context ratio {b['ratio_ltune_over_hf']} (goal >= 2)")
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_train", "_probe", "_ctx", "_matrix"):
        cmd, rest = argv[0], argv[1:]
        if cmd == "_train":
            return cmd_train(rest[0])
        if cmd == "_probe":
            return cmd_probe(rest[0], rest[1:])
        if cmd == "_ctx":
            return cmd_ctx(rest[0])
        return cmd_matrix(rest[0], rest[1])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_validate_out"), help="results folder ($OUT)")
    ap.add_argument("--work", default=None, help="scratch folder (run folders, data, caches)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole run")
    ap.add_argument("--matrix-budget-s", type=float, default=110.0, help="most seconds for phase c")
    ap.add_argument("--hf-search-share", type=float, default=0.4, help="share of the time left that the HF search may use")
    ap.add_argument("--hf-search-max-s", type=float, default=130.0, help="most seconds for the HF search")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: every code path but CUDA's")
    ap.add_argument("--only", default=None, help="comma-separated phases among ctx,a,c,b")
    ap.add_argument("--write-trace", action="store_true", help="precompute bench/gpu_validate_trace.json here (CPU)")
    args = ap.parse_args(argv)
    if args.write_trace:
        return write_trace_file()
    setup = smoke_setup() if args.cpu_smoke else gpu_setup()
    return Runner(args, setup).run()


if __name__ == "__main__":
    sys.exit(main())
