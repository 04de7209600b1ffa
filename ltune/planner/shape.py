"""Layout-independent numbers of a (model, context) pair, and element sizes."""

from __future__ import annotations

from dataclasses import dataclass

from ..profiles.schema import ModelProfile
from .schema import Layout

FP32 = 4  # bytes of an fp32 element
#: bytes of one element of the model dtype (parameters, their gradients, activations)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def upcast_copy_bytes(dtype_bytes: int) -> int:
    """Bytes of the model-dtype copy made when an fp32 result is cast back (or a model-dtype
    tensor is upcast): none when the model dtype is fp32 itself, where `.float()` and
    `.to(fp32)` return their input."""
    return 0 if dtype_bytes == FP32 else dtype_bytes


@dataclass(frozen=True, slots=True)
class Shape:
    """Layout-independent numbers of one (model, seq_len) pair, computed once per plan."""

    params: int
    num_layers: int
    hidden_size: int
    q_size: int
    kv_size: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    largest_leaf_params: int  # biggest module ZeRO-3 gathers at once
    layer_params: int
    persistent_params: int  # tensors at or below stage3_param_persistence_threshold
    seq_len: int
    precision: str = "bf16"
    loss_chunk_tokens: int = 4096
    doc_tokens: int | None = None  # mean packed document length; None: one document fills the sequence

    @property
    def attention_tokens(self) -> int:
        """Keys a query attends over with per-document (varlen) attention: the mean document
        length, at most the sequence."""
        return self.seq_len if self.doc_tokens is None else min(self.doc_tokens, self.seq_len)

    @property
    def dtype_bytes(self) -> int:
        """Bytes of one element of the model dtype."""
        return DTYPE_BYTES[self.precision]

    @classmethod
    def of(
        cls, model: ModelProfile, seq_len: int, precision: str = "bf16", loss_chunk_tokens: int = 4096,
        *, doc_tokens: int | None = None,
    ) -> "Shape":
        if doc_tokens is not None and doc_tokens <= 0:
            raise ValueError(f"doc_tokens must be a positive number of tokens (got {doc_tokens})")
        h = model.hidden_size
        persistent = (2 * model.num_layers + 1) * h  # RMSNorm weights
        if model.attention_bias:
            persistent += model.num_layers * (model.q_size + 2 * model.kv_size)
        return cls(
            params=model.num_params(),
            num_layers=model.num_layers,
            hidden_size=h,
            q_size=model.q_size,
            kv_size=model.kv_size,
            num_attention_heads=model.num_attention_heads,
            intermediate_size=model.intermediate_size,
            vocab_size=model.vocab_size,
            tie_word_embeddings=model.tie_word_embeddings,
            largest_leaf_params=model.largest_tensor_params(),
            layer_params=model.layer_params(),
            persistent_params=persistent,
            seq_len=seq_len,
            precision=precision,
            loss_chunk_tokens=loss_chunk_tokens,
            doc_tokens=doc_tokens,
        )


def tokens_per_rank(shape: Shape, layout: Layout) -> int:
    """Ulysses splits each sequence over sp_degree ranks (Jacobs et al. 2023, DeepSpeed-Ulysses)."""
    return layout.micro_batch_size * -(-shape.seq_len // layout.sp_degree)
