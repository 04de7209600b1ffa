"""Packing tokenized documents into sequences of exactly seq_len tokens.

Documents are shuffled (seeded per epoch) and placed greedily, in order, into
sequences of exactly ``seq_len`` tokens; a document that does not fit in what is left
of the current sequence starts the next one, and the rest is padding (its own segment,
no loss). ``position_ids`` restart at 0 at every document, which is how attention finds
the boundaries. A document longer than ``seq_len`` is split into ``seq_len`` pieces;
the count of split documents is reported, never silently truncated.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..job.constants import IGNORE_INDEX
from .data import TokenizedData
from .errors import TrainerInputError


class _Sequences(Sequence):
    """The sequences of a PackedEpoch as lists of (doc, start, length), made when read."""

    def __init__(self, epoch: "PackedEpoch"):
        self._epoch = epoch

    def __len__(self) -> int:
        return len(self._epoch.seq_starts) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._epoch.segments(index)


@dataclass(frozen=True)
class PackedEpoch:
    """One epoch's sequences, each a run of (doc, start, length) segments, held as flat int64
    arrays (24 bytes a segment, not a Python tuple and its ints): segments
    seq_starts[i]:seq_starts[i + 1] make sequence i."""

    seq_starts: np.ndarray
    seg_doc: np.ndarray
    seg_start: np.ndarray
    seg_len: np.ndarray
    num_split_docs: int
    num_padding_tokens: int

    @property
    def sequences(self) -> _Sequences:
        return _Sequences(self)

    def segments(self, index: int) -> list[tuple[int, int, int]]:
        if not -len(self.sequences) <= index < len(self.sequences):
            raise IndexError(f"sequence {index} of {len(self.sequences)}")
        index %= len(self.sequences)
        a, b = self.seq_starts[index], self.seq_starts[index + 1]
        return list(zip(self.seg_doc[a:b].tolist(), self.seg_start[a:b].tolist(), self.seg_len[a:b].tolist()))


def pack_documents(doc_lengths: np.ndarray, seq_len: int, order: np.ndarray) -> PackedEpoch:
    """Greedy in-order packing into sequences of exactly seq_len tokens (see module doc)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len ({seq_len}) must be positive")
    seq_starts, docs, starts, lens = array("q", [0]), array("q"), array("q"), array("q")
    used = 0
    split = 0
    padding = 0

    def close() -> None:
        nonlocal used, padding
        if len(docs) > seq_starts[-1]:
            padding += seq_len - used
            seq_starts.append(len(docs))
        used = 0

    lengths = doc_lengths.tolist()
    for doc in order.tolist():
        length = lengths[doc]
        if length > seq_len:
            split += 1
        start = 0
        while start < length:
            piece = min(seq_len, length - start)
            if used + piece > seq_len:
                close()
            docs.append(doc)
            starts.append(start)
            lens.append(piece)
            used += piece
            start += piece
            if used == seq_len:
                close()
    close()
    arrays = [np.frombuffer(a, dtype=np.int64) if len(a) else np.zeros(0, np.int64) for a in (seq_starts, docs, starts, lens)]
    return PackedEpoch(*arrays, split, padding)


class PackedDataset:
    """An endless, deterministic stream of packed sequences over epochs.

    Sequence g of the stream is a pure function of (seed, g): epoch e shuffles the
    documents with seed + e. Resuming at step s means reading from g = s x (sequences
    per step): no iterator state to save.
    """

    def __init__(self, data: TokenizedData, seq_len: int, seed: int, pad_token_id: int = 0):
        if data.num_docs == 0:
            raise TrainerInputError("training.data: no documents")
        self.data = data
        self.seq_len = seq_len
        self.seed = seed
        self.pad_token_id = pad_token_id
        self._epochs: dict[int, PackedEpoch] = {}
        self._per_epoch: int | None = None

    def epoch(self, index: int) -> PackedEpoch:
        if index not in self._epochs:
            order = np.random.default_rng(self.seed + index).permutation(self.data.num_docs)
            self._epochs = {index: pack_documents(self.data.doc_lengths, self.seq_len, order)}
        return self._epochs[index]

    @property
    def sequences_per_epoch(self) -> int:
        """Sequences of epoch 0: the stream's epoch length (other epochs pack to a few more or fewer)."""
        if self._per_epoch is None:  # counted once: recounting repacked epoch 0 at every sample of a later epoch
            self._per_epoch = len(self.epoch(0).sequences)
        return self._per_epoch

    def sample(self, index: int) -> dict[str, np.ndarray]:
        """input_ids, position_ids and labels (-100 where there is no loss) of sequence ``index``."""
        per_epoch = self.sequences_per_epoch
        epoch = self.epoch(index // per_epoch)
        # an epoch packed into fewer sequences than epoch 0 starts over for the rest (an IndexError before)
        segments = epoch.segments(index % per_epoch % len(epoch.sequences))
        input_ids = np.full(self.seq_len, self.pad_token_id, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        position_ids = np.zeros(self.seq_len, dtype=np.int64)
        at = 0
        offsets = self.data.doc_offsets
        for doc, start, length in segments:
            lo = offsets[doc] + start
            ids = self.data.tokens[lo : lo + length]
            input_ids[at : at + length] = ids
            labels[at : at + length] = np.where(self.data.loss_mask[lo : lo + length], ids, IGNORE_INDEX)
            position_ids[at : at + length] = np.arange(length)
            at += length
        if at < self.seq_len:  # padding: its own segment, no loss
            position_ids[at:] = np.arange(self.seq_len - at)
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def shard_indices(step: int, micro_step: int, *, micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int) -> list[int]:
    """Stream indices of the sequences one data-parallel rank reads at (step, micro_step).

    Ranks of one sequence-parallel group share a dp_rank and so read the same sequences.
    """
    per_step = micro_batch_size * grad_accum * dp_size
    first = step * per_step + (micro_step * dp_size + dp_rank) * micro_batch_size
    return list(range(first, first + micro_batch_size))


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([s[key] for s in samples]) for key in samples[0]}
