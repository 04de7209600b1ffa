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

    @property
    def key(self) -> str:
        """The configuration's key in results.json and bench/gpu_validate_trace.json."""
        return (
            f"{self.model.name}|ctx={self.seq_len}|z={self.zero_stage}|rc={self.recompute}|loss={self.loss}"
            f"|attn={self.attention}|mb={self.micro_batch_size}|chunk={self.loss_chunk_tokens}"
        )

    @property
    def label(self) -> str:
        """A short name for the printed table."""
        ctx = f"{self.seq_len // 1024}k" if self.seq_len % 1024 == 0 else str(self.seq_len)
        return f"{self.model.name} {ctx} z{self.zero_stage} rc={self.recompute} loss={self.loss}"

    def layout(self) -> Layout:
        """The planner's single-GPU layout of this configuration."""
        return Layout(
            num_gpus=1, zero_stage=self.zero_stage, recompute=self.recompute, loss=self.loss,
            attention=self.attention, micro_batch_size=self.micro_batch_size,
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


def gpu_setup() -> Setup:
    """The device run's sizes (H100 80GB / H200)."""
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
        smoke=False, model=m, trainer_seq_lens=(8192, 32768), trainer_steps=(5, 4), matrix=matrix, matrix_steps=2,
        search_start=8192, search_granularity=4096, search_bisections=2, search_steps=1,
        search_max=1 << 21, doc_tokens=600_000, num_docs=3,
    )


def smoke_setup() -> Setup:
    """--cpu-smoke's sizes: tiny models and contexts, fake OOM caps for the search."""
    m, q = MODEL_TINY, MODEL_TINY_QWEN
    matrix = [
        Config(q, 256, zero_stage=0, recompute="none", loss="full"),
        Config(q, 512, zero_stage=3, recompute="full", loss="chunked", loss_chunk_tokens=128),
        Config(m, 256, zero_stage=3, recompute="none", loss="full"),
    ]
    return Setup(
        smoke=True, model=m, trainer_seq_lens=(256, 512), trainer_steps=(2, 2), matrix=matrix, matrix_steps=2,
        search_start=256, search_granularity=128, search_bisections=1, search_steps=1,
        search_max=1 << 14, doc_tokens=2_500, num_docs=4,
        fake_oom_tokens={"ltune": 1500, "hf": 700},
    )
