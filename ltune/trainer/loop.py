"""The training loop, as a table of contents (in the style of torchtitan's Trainer.train).

``Trainer.train`` reads top to bottom: join the process group, read the run folder,
prepare the data, build the engine, resume, then for each step: read the batches, run
the step, log it, checkpoint when due or when asked to stop; at the end save, export.
Every piece is one small method below.

Loss normalisation: the loss is the mean over all real (non -100) target tokens of the
global batch. Each rank counts the tokens it will feed in this step (all its micro
batches; under sequence parallelism, its shard of them); an all-reduce gives the global
count G. Each micro batch backpropagates loss_sum x W x A / G, where W is what DeepSpeed
divides the all-rank gradient sum by (the world size without sp;
``sequence_parallel.deepspeed_grad_divisor`` with it) and A the gradient accumulation
steps DeepSpeed divides by, so the applied gradient is exactly
d(sum of all token losses)/dθ / G. Mixture-of-experts models: each micro batch's loss_sum also
holds router_aux_loss_coef x its target tokens x its load-balancing loss (``model.TrainModel``),
so the aux loss is averaged over micro batches and ranks like the LM loss; the logged ``loss`` is
the LM loss alone, ``aux_loss`` and the router statistics beside it (``metrics.RouterTotals``).

Sequence parallelism (Ulysses, sp_degree > 1, ``sequence_parallel.py``): sp groups are
contiguous ranks that read the same packed sequence (dp_rank = rank // sp_degree); each
keeps its slice (``shard_batch``: labels shifted and cu_seqlens taken over the whole
sequence first), and attention runs through DeepSpeed's ``UlyssesSPAttentionHF`` around
the trainer's varlen core.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..job.constants import IGNORE_INDEX
from ..job.data_files import check_tokenizer_dir, data_files
from ..job.ds_config import build_ds_config
from ..job.methods import refuse_unrunnable_method
from ..job.paths import DS_CONFIG_FILE, PLAN_FILE, resolve_plan_paths
from ..planner.io import load_plan
from . import checkpoint, engine as engine_lib
from .attention import cu_seqlens_from_position_ids
from .data import check_supported, load_or_tokenize, load_tokenizer
from .packing import PackedDataset, collate, shard_indices
from .errors import TrainerInputError
from .loss import shift_labels
from .metrics import (
    PROGRESS_ENV, MetricsWriter, RouterTotals, flops_per_token, peak_flops_per_gpu, peak_memory, predicted,
    progress_mode, progress_status, step_throughput, truncate_metrics,
)
from .model import build_model

EXIT_TERMINATED = 143  # 128 + SIGTERM, after the checkpoint is written (SIGUSR1 too)
#: a stop: SIGTERM (a launcher, scancel), SIGUSR1 (Slurm's --signal before the time limit)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def checkpoint_every_steps(plan) -> int:
    """Steps between checkpoints: training.checkpoint_every when set; else the plan's predicted
    interval (checkpoint_minutes of predicted steps, ltune/planner/checkpointing.py), computed
    again from the stored step time; 0 (only at the end) for a plan without a prediction."""
    from ..planner.checkpointing import every_steps

    training = plan.training
    if training.checkpoint_every is not None:
        return training.checkpoint_every
    if plan.prediction is None:
        return 0
    return every_steps(None, training.checkpoint_minutes, plan.prediction.throughput.step_time_s)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class Trainer:
    """All of the run's state is declared here, grouped by the setup step that fills it in."""

    def __init__(self, run_dir: str | Path, resume: bool = False):
        self.run_dir = Path(run_dir).resolve()
        self.resume = resume
        self.step = 0  # optimizer steps done
        self._stop_signal = False
        self._last_saved_step: int | None = None
        # read_run_dir, check_inputs
        self.plan = None
        self.ds_config: dict | None = None
        self.tokenizer = None
        # join_process_group
        self.rank = 0
        self.world_size = 1
        self.sp_degree = 1
        self.dp_size = 1
        self.dp_rank = 0
        self.sp_rank = 0
        self.mpu = None  # DeepSpeed's sequence-parallel groups when sp_degree > 1
        self.device: torch.device | None = None
        # prepare_data
        self.data_from_cache = False
        self.pad_token_id = 0
        self.dataset: PackedDataset | None = None
        self.sequences_per_step = 0  # packed sequences of one optimizer step, all ranks
        self.total_steps = 0
        # build_engine
        self.engine = None
        self.grad_divisor = 1.0  # what DeepSpeed divides the all-rank gradient sum by
        self.flops_per_token = 0.0
        self.peak_flops: float | None = None
        self.prediction: dict = {}
        # open_logs (rank 0 only)
        self.metrics: MetricsWriter | None = None
        self.console = None
        self.progress = None  # the live progress line ("tty" mode only)
        self.task = None

    # ------------------------------------------------------------ table of contents

    def train(self) -> int:
        self.read_run_dir()
        self.check_inputs()
        self.join_process_group()
        self.prepare_data()
        self.build_engine()
        self.restore_checkpoint()
        self.open_logs()
        while self.step < self.total_steps:
            batches = self.next_batches()
            record = self.train_step(batches)
            self.log_step(record)
            if self.checkpoint_due():
                self.save_checkpoint()
            if self.stop_requested():
                self.save_checkpoint()
                self.close_logs()
                return EXIT_TERMINATED
        self.save_checkpoint()
        self.export()
        self.close_logs()
        return 0

    # ------------------------------------------------------------ setup

    def read_run_dir(self) -> None:
        plan_file = self.run_dir / PLAN_FILE
        if not plan_file.is_file():
            raise TrainerInputError(f"{self.run_dir}: no plan.yaml in the run folder")
        self.plan = resolve_plan_paths(load_plan(plan_file), self.run_dir)
        ds_file = self.run_dir / DS_CONFIG_FILE
        self.ds_config = json.loads(ds_file.read_text()) if ds_file.is_file() else build_ds_config(self.plan)

    def check_inputs(self) -> None:
        """A missing data file or tokenizer fails here, on every rank, before any heavy work.
        The records themselves are checked once per run, each rank its own share, while they
        are tokenized (prepare_data; `ltune launch` checked them all before starting)."""
        check_supported(self.plan)
        refuse_unrunnable_method(self.plan)  # qlora without CUDA (`ltune launch` refused it already)
        check_tokenizer_dir(self.plan)
        data_files(self.plan.training.data)
        self.tokenizer = load_tokenizer(self.plan)
        vocab = self.plan.model.architecture.vocab_size
        if len(self.tokenizer) > vocab:
            raise TrainerInputError(f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is {vocab}")

    def join_process_group(self) -> None:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # DeepSpeed 0.19 calls collectives that torch 2.13 marks deprecated, once per call
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        engine_lib.init_distributed(self.plan.training.collective_timeout_minutes)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        layout = self.plan.layout
        if self.world_size != layout.num_gpus:
            raise TrainerInputError(f"the job has {self.world_size} processes but the plan's num_gpus is {layout.num_gpus}")
        self.sp_degree = layout.sp_degree
        self.dp_size = self.world_size // self.sp_degree
        self.dp_rank = self.rank // self.sp_degree  # sp groups are contiguous ranks: same sequences
        self.sp_rank = self.rank % self.sp_degree
        self.mpu = None
        if self.sp_degree > 1:
            from .sequence_parallel import init_sp_groups

            self.mpu = init_sp_groups(self.sp_degree)
        self.device = engine_lib.device()
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_sigterm)

    def prepare_data(self) -> None:
        """The ranks sharing the cache folder hash and tokenize their shares of the corpus into it
        together (``data.load_or_tokenize``), then each memory-maps it; no wait is longer than the
        process group's timeout (training.collective_timeout_minutes)."""
        from datetime import timedelta

        from .data import cache_comm, cache_root

        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or self.world_size)
        timeout = timedelta(minutes=self.plan.training.collective_timeout_minutes)
        comm = cache_comm(cache_root(), local, timeout=timeout)
        data, self.data_from_cache = load_or_tokenize(self.plan, self.tokenizer, comm)
        training, layout = self.plan.training, self.plan.layout
        if data.max_token() >= self.plan.model.architecture.vocab_size:
            raise TrainerInputError(
                f"token id {data.max_token()} is outside the model's vocab_size "
                f"({self.plan.model.architecture.vocab_size})"
            )
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.dataset = PackedDataset(data, training.seq_len, training.seed, pad_token_id=self.pad_token_id)
        epoch = self.dataset.epoch(0)
        self.sequences_per_step = layout.micro_batch_size * training.gradient_accumulation_steps * self.dp_size
        if training.max_steps is not None:
            self.total_steps = training.max_steps
        else:
            self.total_steps = max(1, math.ceil(training.epochs * len(epoch.sequences) / self.sequences_per_step))
        self.say(
            f"data: {data.num_docs} documents, {len(data.tokens)} tokens"
            f"{' (cached)' if self.data_from_cache else ''}; {len(epoch.sequences)} sequences of {training.seq_len}"
            f" per epoch; {epoch.num_split_docs} documents longer than seq_len split;"
            f" {epoch.num_padding_tokens} padding tokens"
        )

    def build_engine(self) -> None:
        model = build_model(self.plan, self.ds_config)
        if self.mpu is not None:
            from .sequence_parallel import install_ulysses_attention

            install_ulysses_attention(model.lm, self.mpu.get_sequence_parallel_group(), self.plan.layout.micro_batch_size)
        self.use_engine(engine_lib.initialize(self.plan, self.ds_config, model, self.total_steps, mpu=self.mpu))
        arch = self.plan.model.architecture
        self.flops_per_token = flops_per_token(arch, self.plan.training.seq_len, self.plan.method)
        self.peak_flops = peak_flops_per_gpu(self.plan)
        self.prediction = predicted(self.plan)
        method = self.plan.method
        trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)
        self.say(
            f"model: {arch.num_params() / 1e6:.1f}M parameters"
            f"{f' ({method.kind}: {trainable / 1e6:.3f}M trainable)' if method.adapters else ''}, "
            f"ZeRO-{self.plan.layout.zero_stage}, "
            f"{self.plan.training.precision}, {self.world_size} processes, {self.total_steps} steps"
        )

    def use_engine(self, engine) -> None:
        """Train with ``engine``; the divisor DeepSpeed applies to gradients is read from it."""
        from .sequence_parallel import deepspeed_grad_divisor

        self.engine = engine
        self.grad_divisor = deepspeed_grad_divisor(engine, self.sp_degree)

    def restore_checkpoint(self) -> None:
        if not self.resume:
            return
        step, skipped = checkpoint.load(self.engine, self.run_dir, adapters=self.plan.method.adapters)
        for tag, reason in skipped:
            self.say(f"resume: skipping checkpoint {tag}: {reason}")
        if step is None:
            self.say("resume: no complete checkpoint, starting from step 0")
            return
        self.step = self._last_saved_step = step
        self.say(f"resume: continuing after step {step}")

    def open_logs(self) -> None:
        if self.rank != 0:
            return
        path = self.run_dir / "metrics.jsonl"
        if self.resume and path.is_file():  # drop steps logged after the checkpoint, and a torn line
            dropped = truncate_metrics(path, self.step)
            if dropped:
                self.say(f"resume: metrics.jsonl: dropped {dropped} unreadable line(s) (a write cut short)")
        self.metrics = MetricsWriter(path, append=self.resume)
        from rich.console import Console

        # under the DeepSpeed launcher our stderr is a pipe: `ltune launch` says (LTUNE_PROGRESS)
        # whether its own output is a terminal; "plain" prints a log line every log_every steps
        if progress_mode(os.environ.get(PROGRESS_ENV), sys.stderr.isatty()) == "plain":
            self.console = Console(stderr=True)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True, force_terminal=True)
        self.progress = Progress(  # one line within 80 columns: the launcher's width is not known here
            BarColumn(bar_width=8), MofNCompleteColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"), console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=self.total_steps, completed=self.step, status="")

    # ------------------------------------------------------------ one step

    def next_batches(self) -> list[dict]:
        """This rank's micro batches of the current step, on the device."""
        layout, training = self.plan.layout, self.plan.training
        batches = []
        for micro in range(training.gradient_accumulation_steps):
            indices = shard_indices(
                self.step, micro, micro_batch_size=layout.micro_batch_size,
                grad_accum=training.gradient_accumulation_steps, dp_rank=self.dp_rank, dp_size=self.dp_size,
            )
            arrays = collate([self.dataset.sample(i) for i in indices])
            batches.append(self.prepare_micro_batch(arrays))
        return batches

    def prepare_micro_batch(self, arrays: dict[str, np.ndarray]) -> dict:
        """Tensors on the device, labels shifted per document, document boundaries.

        Under sequence parallelism: this rank's slice of the sequence (``shard_batch``).
        """
        batch = {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}
        if self.sp_degree > 1:
            from .sequence_parallel import shard_batch

            return shard_batch(batch, self.sp_rank, self.sp_degree, pad_token_id=self.pad_token_id)
        batch["labels"] = shift_labels(batch["labels"], batch["position_ids"])
        if self.plan.layout.attention == "varlen":
            batch["cu_seqlens"], batch["max_seqlen"] = cu_seqlens_from_position_ids(batch["position_ids"])
        else:
            batch["cu_seqlens"], batch["max_seqlen"] = None, None
        return batch

    def train_step(self, batches: list[dict]) -> dict:

        self._sync()
        start = time.perf_counter()
        lr = self.engine.get_lr()[0]
        local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        global_tokens = max(1, int(self._all_reduce(float(local_tokens))))
        scale = self.grad_divisor * len(batches) / global_tokens
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        router = RouterTotals(self.device) if self.plan.model.architecture.is_moe else None
        for b in batches:
            micro_loss_sum, micro_tokens = self.engine(
                b["input_ids"], b["position_ids"], b["labels"], b["cu_seqlens"], b["max_seqlen"]
            )
            self.engine.backward(micro_loss_sum * scale)
            self.engine.step()
            if router is None:
                loss_sum += micro_loss_sum.detach().float()
            else:  # the loss sum less the aux term (TrainModel), and the routing of the micro batch
                loss_sum += router.add(self.engine.module.router_stats, micro_tokens)
        if router is None:
            loss = self._all_reduce(loss_sum.item()) / global_tokens
            moe_record = {}
        else:
            loss, moe_record = router.reduce(loss_sum, global_tokens)
        self._sync()
        step_time_s = time.perf_counter() - start
        self.step += 1
        grad_norm = self.engine.get_global_grad_norm()
        # all tokens computed on, padding included (loss_tokens counts the real targets)
        tokens_per_step = self.sequences_per_step * self.plan.training.seq_len
        tokens_per_s_per_gpu, mfu = step_throughput(
            tokens_per_step, step_time_s, self.world_size, self.flops_per_token, self.peak_flops
        )
        return {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s_per_gpu": tokens_per_s_per_gpu,
            "mfu": mfu,
            "step_time_s": step_time_s,
            "loss_tokens": global_tokens,
            "step_applied": bool(self.engine.was_step_applied()),
            **moe_record,
        }

    def log_step(self, record: dict) -> None:
        peaks = peak_memory()
        per_rank = self._all_gather([float(v) for v in peaks.values()])  # one row per rank
        for i, key in enumerate(peaks):
            column = [int(row[i]) for row in per_rank]
            record[key] = max(column)
            record[f"{key}_per_rank"] = column
        record.update(self.prediction)
        record["unix_time_s"] = time.time()
        if self.rank != 0:
            return
        self.metrics.write(record)
        if self.progress is not None:  # one live line; only the last step's log line stays
            self.progress.update(self.task, completed=self.step, status=progress_status(record))
            if self.step == self.total_steps:
                self.console.print(self._format(record), highlight=False, soft_wrap=True)
        elif self.step % self.plan.training.log_every == 0 or self.step == self.total_steps:
            self.console.print(self._format(record), highlight=False, soft_wrap=True)

    # ------------------------------------------------------------ checkpoints, stop, export

    def checkpoint_due(self) -> bool:
        every = checkpoint_every_steps(self.plan)
        return every > 0 and self.step % every == 0

    def save_checkpoint(self) -> None:
        """Save (all ranks); once complete, rank 0 removes the complete checkpoints beyond keep_last."""
        if self._last_saved_step == self.step:
            return
        path = checkpoint.save(self.engine, self.run_dir, self.step, adapters=self.plan.method.adapters)
        self._last_saved_step = self.step
        self.say(f"checkpoint: {path}")
        if self.rank == 0:
            removed = checkpoint.prune(self.run_dir, self.world_size, self.plan.training.keep_last)
            if removed:
                self.say(f"checkpoint: removed {', '.join(removed)} (keep_last {self.plan.training.keep_last})")

    def stop_requested(self) -> bool:
        """True on every rank when any rank got SIGTERM or SIGUSR1 (so that all of them save together)."""
        return self._all_reduce(float(self._stop_signal), op=dist.ReduceOp.MAX) > 0

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_signal = True

    def export(self) -> None:
        from .export import export_adapter, export_hf_model

        if self.plan.method.adapters:
            out = export_adapter(self.engine, self.plan, self.run_dir)
            if out is not None:
                self.say(f"exported: {out}")
            if not self.plan.method.export_merged:
                return
        out = export_hf_model(self.engine, self.plan, self.run_dir, self.tokenizer)
        if out is not None:
            self.say(f"exported: {out}")

    def close_logs(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.metrics is not None:
            self.metrics.close()

    # ------------------------------------------------------------ helpers

    def say(self, message: str) -> None:
        if _rank() == 0:
            if self.console is not None:
                self.console.print(message, highlight=False, soft_wrap=True)
            else:
                print(f"ltune.trainer: {message}", flush=True)

    def _format(self, r: dict) -> str:
        parts = [f"step {r['step']}/{self.total_steps}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.3g}"]
        if r["grad_norm"] is not None:
            parts.append(f"grad_norm {r['grad_norm']:.3f}")
        if "aux_loss" in r:
            parts.append(f"aux {r['aux_loss']:.4f}")
        parts.append(f"tokens/s/gpu {r['tokens_per_s_per_gpu']:.0f}")
        if r["mfu"] is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        for key in ("peak_allocated_bytes", "peak_rss_bytes"):
            if key in r:
                parts.append(f"peak {r[key] / 2**30:.2f} GiB")
        if "predicted_peak_bytes" in r:
            parts.append(f"(plan {r['predicted_peak_bytes'] / 2**30:.2f} GiB)")
        return "  ".join(parts)

    def _all_reduce(self, value: float, op=dist.ReduceOp.SUM) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return float(t.item())

    def _all_gather(self, values: list[float]) -> list[list[float]]:
        """``values`` of every rank, in rank order."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        rows = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(rows, t)
        return [row.tolist() for row in rows]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
