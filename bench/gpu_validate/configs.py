"""The models and single-GPU configurations the checks run: the GPU sizes and the CPU smoke ones."""

from __future__ import annotations

from dataclasses import dataclass, field

from ltune.planner.schema import Layout
from ltune.profiles import resolve_model
from ltune.profiles.schema import ModelProfile

# The "~1B" llama shape: 0.85B parameters (TinyLlama-1.1B's widths -- hidden 2048, 32 heads,
# 8 kv heads, ffn 5632 -- with 16 layers instead of 22; Llama-2's vocabulary of 32000).
MODEL_1B = ModelProfile(
    name="llama-1b-bench",
    source="bench/gpu_validate/configs.py: TinyLlama-1.1B widths (2048/32 heads/8 kv/5632), 16 layers, vocab 32000",
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
    source="bench/gpu_validate/configs.py (--cpu-smoke)",
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
    loss_chunk_tokens: int = 4096
    offload: str = "none"
    num_gpus: int = 1  # > 1 only for trace-only rows (sequence parallelism: one process per sp rank)
    sp_degree: int = 1
    note: str = ""  # what the row checks (memory_matrix), not part of the key

    @property
    def key(self) -> str:
        """The configuration's key in results.json and bench/gpu_validate_trace.json (offload, GPUs
        and sp appear only when not the default, so the older keys still hold)."""
        key = (
            f"{self.model.name}|ctx={self.seq_len}|z={self.zero_stage}|rc={self.recompute}|loss={self.loss}"
            f"|attn={self.attention}|mb={self.micro_batch_size}|chunk={self.loss_chunk_tokens}"
        )
        if self.offload != "none":
            key += f"|off={self.offload}"
        if self.num_gpus != 1 or self.sp_degree != 1:
            key += f"|gpus={self.num_gpus}|sp={self.sp_degree}"
        return key

    @property
    def label(self) -> str:
        """A short name for the printed table."""
        ctx = f"{self.seq_len // 1024}k" if self.seq_len % 1024 == 0 else str(self.seq_len)
        label = f"{self.model.name} {ctx} z{self.zero_stage} rc={self.recompute} loss={self.loss}"
        if self.offload != "none":
            label += f" off={self.offload}"
        if self.micro_batch_size != 1:
            label += f" mb={self.micro_batch_size}"
        if self.sp_degree != 1:
            label += f" sp={self.sp_degree}/{self.num_gpus}gpu"
        return label

    @property
    def trace_only(self) -> bool:
        """Rows that one GPU cannot run: more than one rank (see memory_matrix's SP_ON_ONE_GPU)."""
        return self.num_gpus > 1

    def layout(self) -> Layout:
        """The planner's layout of this configuration (one GPU unless a trace-only row)."""
        return Layout(
            num_gpus=self.num_gpus, zero_stage=self.zero_stage, recompute=self.recompute, loss=self.loss,
            attention=self.attention, micro_batch_size=self.micro_batch_size, offload=self.offload,
            sp_degree=self.sp_degree,
        )


def trainer_config(model: ModelProfile, seq_len: int) -> Config:
    """trainer_runs' configuration: ZeRO-3, full recompute, full loss."""
    return Config(model, seq_len, zero_stage=3, recompute="full", loss="full")


def longest_context_config(kind: str, model: ModelProfile, seq_len: int) -> Config:
    """longest_context's configuration: ltune (full recompute, chunked loss) or hf (none, full)."""
    if kind == "ltune":
        return Config(model, seq_len, zero_stage=3, recompute="full", loss="chunked")
    return Config(model, seq_len, zero_stage=3, recompute="none", loss="full")


@dataclass
class Setup:
    """Sizes of a run: the GPU one, or the CPU smoke one."""

    smoke: bool
    model: ModelProfile
    trainer_seq_lens: tuple[int, ...]
    trainer_steps: tuple[int, ...]
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


def layout_rows(m: ModelProfile, q: ModelProfile, m_seq: int, q_seq: int, sp_seq: int, chunk: int) -> list[Config]:
    """memory_matrix's layout rows, most informative first (a run cut short keeps the first).

    ``m`` (many parameters) is the trainer_runs model, at trainer_runs' first context
    ``m_seq`` with its settings (ZeRO-3, full recompute, full loss), so each ``m`` row differs
    from that run in one setting only; ``q`` (a large vocabulary) at ``q_seq`` for the rows
    that pair with the older ZeRO-0/3 rows at the same context.
    """
    return [
        Config(m, m_seq, zero_stage=3, offload="optimizer", note=(
            "ZeRO-3 + optimizer offload: master weights and Adam moments leave the GPU (planner: 0 there), "
            "DeepSpeed's CPU Adam, pinned fp32 gradient staging, ipg bucket; host: host_offload_bytes_per_gpu")),
        Config(m, m_seq, zero_stage=3, offload="all", note=(
            "ZeRO-3 + full offload: the bf16 weights leave the GPU too (planner: 0), so the gathered "
            "parameters and their prefetch (zero_buffers' gathered part) are the GPU's model states")),
        Config(m, m_seq, zero_stage=2, note=(
            "ZeRO-2 on one GPU (no sharding with N=1): the contiguous reduce bucket at its cap "
            "(P > reduce_bucket_size = 500M elements), whole fp32 master/moments, gradient partition")),
        Config(q, q_seq, zero_stage=1, recompute="full", loss="chunked", loss_chunk_tokens=chunk, note=(
            "ZeRO-1 on one GPU: the reduce bucket below its cap (P < 500M elements, bucket = P), whole "
            "bf16 gradients; pairs with the ZeRO-0 row of the same model and context")),
        Config(m, sp_seq, zero_stage=3, num_gpus=2, sp_degree=2, loss="chunked", loss_chunk_tokens=chunk, note=(
            "Ulysses sp 2 (trace only, see SP_ON_ONE_GPU): per-rank activations of seq_len/2 tokens "
            "(ltune.trace) beside the planner's activation terms; ZeRO-3 states over 2 ranks")),
        Config(q, q_seq, zero_stage=3, micro_batch_size=2, note=(
            "micro-batch 2: activations and logits of two packed sequences per micro-batch "
            "(planner: linear in micro_batch_size)")),
        Config(q, 2 * q_seq, zero_stage=3, loss="chunked", loss_chunk_tokens=chunk, note=(
            "chunked loss: fp32 logits of loss_chunk_tokens at a time; pairs with the next row (full loss)")),
        Config(q, 2 * q_seq, zero_stage=3, loss="full", note=(
            "full loss: fp32 logits of every token (vocab 151936 for qwen); the logits_loss term")),
    ]


def gpu_setup() -> Setup:
    """The device run's sizes (H100 80GB / H200)."""
    m, q = MODEL_1B, resolve_model("qwen2.5-0.5b")
    # the layouts first; then the older ZeRO-0/3 rows (the q 8192 z3 full/full one is layout_rows' last),
    # the two that pair with layout rows first: m 8k ZeRO-0 (with ZeRO-2 and trainer_runs' ZeRO-3 8k)
    # and q 4k ZeRO-0 (with ZeRO-1)
    matrix = layout_rows(m, q, m_seq=8192, q_seq=4096, sp_seq=16384, chunk=4096) + [
        Config(m, 8192, zero_stage=0, recompute="full", loss="full"),
        Config(q, 4096, zero_stage=0, recompute="full", loss="chunked"),
        Config(q, 2048, zero_stage=0, recompute="none", loss="full"),
        Config(q, 16384, zero_stage=3, recompute="full", loss="chunked"),
        Config(m, 2048, zero_stage=3, recompute="none", loss="full"),
        Config(m, 4096, zero_stage=0, recompute="none", loss="chunked"),
        Config(m, 16384, zero_stage=3, recompute="full", loss="chunked"),
    ]
    return Setup(
        smoke=False, model=m, trainer_seq_lens=(8192, 32768), trainer_steps=(5, 4), matrix=matrix, matrix_steps=2,
        search_start=8192, search_granularity=4096, search_bisections=2, search_steps=1,
        search_max=1 << 21, doc_tokens=600_000, num_docs=3,
    )


def smoke_setup() -> Setup:
    """--cpu-smoke's sizes: tiny models and contexts, every row type of the GPU matrix, fake OOM caps for the search."""
    m, q = MODEL_TINY, MODEL_TINY_QWEN
    matrix = layout_rows(m, q, m_seq=256, q_seq=256, sp_seq=512, chunk=128) + [
        Config(q, 256, zero_stage=0, recompute="none", loss="full"),
        Config(m, 256, zero_stage=3, recompute="none", loss="full"),
    ]
    return Setup(
        smoke=True, model=m, trainer_seq_lens=(256, 512), trainer_steps=(2, 2), matrix=matrix, matrix_steps=2,
        search_start=256, search_granularity=128, search_bisections=1, search_steps=1,
        search_max=1 << 14, doc_tokens=2_500, num_docs=4,
        fake_oom_tokens={"ltune": 1500, "hf": 700},
    )
