"""Training data: chat rendering, tokenization and its cache (records read and checked by
``ltune.job.data_files``, shared with the launcher).

Records are JSON objects, one per line: ``{"text": "..."}`` (loss on every token) or
``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered with the tokenizer's
chat template, loss on the assistant turns only.

This module imports no torch; transformers is imported only to tokenize.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..job.data_files import check_tokenizer_dir, data_files, iter_records
from ..planner.schema import Plan
from .errors import TrainerInputError

CACHE_FORMAT_VERSION = 1

# ---------------------------------------------------------------- checks


def check_supported(plan: Plan) -> None:
    """Layouts this trainer cannot run yet, refused up front by the trainer (one line, exit 2).

    Not part of ``ltune.job.data_files.validate_data``: the launcher may still plan, dry-run or write sbatch
    scripts for such layouts.
    """
    if plan.layout.sp_degree > 1 and plan.layout.attention == "eager":
        raise TrainerInputError(
            f"layout.sp_degree ({plan.layout.sp_degree}) needs attention 'varlen' (Ulysses wraps the varlen core), not 'eager'"
        )


# ---------------------------------------------------------------- tokenization


def load_tokenizer(plan: Plan):
    from transformers import AutoTokenizer

    folder = check_tokenizer_dir(plan)
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=plan.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise TrainerInputError(f"model.tokenizer: cannot load {folder} ({str(e).splitlines()[0]})") from None


def _render(tokenizer, messages: list[dict], where: str, **kwargs) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as e:  # e.g. a template's raise_exception('roles must alternate ...')
        message = (str(e).splitlines() or [type(e).__name__])[0]
        raise TrainerInputError(f"{where}: the tokenizer's chat template refuses this conversation ({message})") from None


def assistant_char_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of the assistant turns.

    Rendered turn by turn: the span of assistant turn i runs from the end of
    render(messages[:i], add_generation_prompt=True) (which ends with the assistant
    header) to the end of render(messages[:i+1]) (which includes the end-of-turn
    marker, so the model learns to stop). Needs templates whose renderings of a
    conversation's prefixes are prefixes of its rendering, as most are.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TrainerInputError(f"{where}: chat record but the tokenizer has no chat template")
    full = _render(tokenizer, messages, where)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], where, add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], where)
        if not (full.startswith(upto) and upto.startswith(head)):
            raise TrainerInputError(
                f"{where}: the tokenizer's chat template does not render turn by turn "
                "(a prefix of the conversation does not render to a prefix)"
            )
        spans.append((len(head), len(upto)))
    return full, spans


def tokenize_record(tokenizer, kind: str, record: dict, where: str) -> tuple[list[int], list[bool]]:
    """Token ids and the loss mask of one record."""
    if kind == "text":
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return ids, [True] * len(ids)
    text, spans = assistant_char_spans(tokenizer, record["messages"], where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s <= start < e for s, e in spans) for start, _ in enc["offset_mapping"]]
    if not any(mask):
        raise TrainerInputError(f"{where}: the assistant turns render to no tokens")
    return enc["input_ids"], mask


@dataclass
class TokenizedData:
    """All documents, concatenated: token ids, loss mask, and document offsets."""

    tokens: np.ndarray  # int32 (total_tokens,)
    loss_mask: np.ndarray  # bool (total_tokens,)
    doc_offsets: np.ndarray  # int64 (num_docs + 1,)

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)


def tokenize_files(tokenizer, files: list[Path]) -> TokenizedData:
    tokens: list[int] = []
    mask: list[bool] = []
    offsets = [0]
    for path in files:
        for kind, where, record in iter_records(path):
            ids, m = tokenize_record(tokenizer, kind, record, where)
            tokens.extend(ids)
            mask.extend(m)
            offsets.append(len(tokens))
    return TokenizedData(
        np.asarray(tokens, dtype=np.int32), np.asarray(mask, dtype=bool), np.asarray(offsets, dtype=np.int64)
    )


def _sha256_file(path: Path, h) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def cache_key(files: list[Path], tokenizer_folder: Path) -> str:
    """A hash of the data files' contents, the tokenizer folder's files and the format."""
    h = hashlib.sha256(f"ltune-tokenized-v{CACHE_FORMAT_VERSION}".encode())
    for path in files:
        h.update(str(path.resolve()).encode())
        _sha256_file(path, h)
    for path in sorted(p for p in tokenizer_folder.iterdir() if p.is_file()):
        h.update(path.name.encode())
        _sha256_file(path, h)
    return h.hexdigest()[:24]


def cache_root() -> Path:
    return Path(os.environ.get("LTUNE_CACHE_DIR", Path.home() / ".cache" / "ltune")) / "tokenized"


def load_or_tokenize(plan: Plan, tokenizer=None) -> tuple[TokenizedData, bool]:
    """The plan's data, tokenized, from the cache when the inputs are unchanged.

    Returns (data, from_cache). The cache folder is written whole or not at all
    (a temporary folder renamed into place), so concurrent writers are harmless.
    """
    files = data_files(plan.training.data)
    folder = cache_root() / cache_key(files, check_tokenizer_dir(plan))
    if (folder / "meta.json").is_file():
        data = TokenizedData(
            np.load(folder / "tokens.npy"), np.load(folder / "loss_mask.npy"), np.load(folder / "doc_offsets.npy")
        )
        return data, True
    tokenizer = tokenizer or load_tokenizer(plan)
    data = tokenize_files(tokenizer, files)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "tokens.npy", data.tokens)
    np.save(tmp / "loss_mask.npy", data.loss_mask)
    np.save(tmp / "doc_offsets.npy", data.doc_offsets)
    meta = {"files": [str(f) for f in files], "num_docs": data.num_docs, "num_tokens": int(len(data.tokens))}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        tmp.rename(folder)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return data, False
