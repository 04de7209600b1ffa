"""Training data: JSONL reading and checks, chat rendering, a tokenization cache.

Records are JSON objects, one per line: ``{"text": "..."}`` (loss on every token) or
``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered with the tokenizer's
chat template, loss on the assistant turns only. A data path is a JSONL file or a
folder of them (``*.jsonl``, recursively, sorted).

This module imports no torch (the launcher calls ``validate_data`` before any process
starts); transformers is imported only to tokenize.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..planner.schema import Plan
from .errors import TrainerInputError
from .paths import tokenizer_dir

IGNORE_INDEX = -100
CACHE_FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# ---------------------------------------------------------------- reading and checks


def data_files(paths: list[str]) -> list[Path]:
    """The JSONL files named by ``paths`` (files, or folders searched for *.jsonl)."""
    if not paths:
        raise TrainerInputError("training.data: no data files given")
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
            if not found:
                raise TrainerInputError(f"{path}: folder holds no *.jsonl files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise TrainerInputError(f"{path}: data file not found")
    return files


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise TrainerInputError(f"{where}: 'messages' must be a non-empty list")
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            raise TrainerInputError(f"{where}: each message needs a 'role' string")
        if not isinstance(turn.get("content"), str):
            raise TrainerInputError(f"{where}: message content must be a string (role {turn['role']!r})")
    if not any(t["role"] == "assistant" and t["content"] for t in messages):
        raise TrainerInputError(f"{where}: chat record has no assistant turn to train on")


def check_record(record, where: str) -> str:
    """'text' or 'chat' for a valid record; a TrainerInputError naming ``where`` otherwise."""
    if not isinstance(record, dict):
        raise TrainerInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        _check_messages(record["messages"], where)
        return "chat"
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise TrainerInputError(f"{where}: 'text' must be a non-empty string")
        return "text"
    raise TrainerInputError(f"{where}: record has neither 'text' nor 'messages'")


def iter_records(path: Path) -> Iterator[tuple[str, str, dict]]:
    """(kind, where, record) for every non-blank line of a JSONL file, checked."""
    empty = True
    try:
        handle = path.open(encoding="utf-8")
    except OSError as e:
        raise TrainerInputError(f"{path}: cannot read ({e.strerror})") from None
    with handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            empty = False
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainerInputError(f"{where}: malformed JSON ({e.msg})") from None
            yield check_record(record, where), where, record
    if empty:
        raise TrainerInputError(f"{path}: data file is empty")


def check_tokenizer_dir(plan: Plan) -> Path:
    folder = tokenizer_dir(plan)
    if folder is None:
        raise TrainerInputError("model.tokenizer: not set (a random-init model needs a tokenizer folder)")
    if not folder.is_dir():
        raise TrainerInputError(f"model.tokenizer: folder {folder} not found")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise TrainerInputError(
            f"model.tokenizer: {folder} holds no tokenizer ({', '.join(TOKENIZER_FILES)})"
        )
    return folder


def check_supported(plan: Plan) -> None:
    """Layouts this trainer cannot run yet, refused up front by the trainer (one line, exit 2).

    Not part of validate_data: the launcher may still plan, dry-run or write sbatch
    scripts for such layouts.
    """
    if plan.layout.sp_degree > 1 and plan.layout.attention == "eager":
        raise TrainerInputError(
            f"layout.sp_degree ({plan.layout.sp_degree}) needs attention 'varlen' (Ulysses wraps the varlen core), not 'eager'"
        )
    if plan.layout.loss == "chunked" and importlib.util.find_spec("ltune.trainer.chunked_loss") is None:
        raise TrainerInputError("layout.loss 'chunked' needs ltune/trainer/chunked_loss.py (issue 4)")


@dataclass(frozen=True)
class DataSummary:
    files: tuple[str, ...]
    num_text: int
    num_chat: int


def validate_data(plan: Plan) -> DataSummary:
    """Check the plan's data files and tokenizer folder without tokenizing (no torch).

    Paths must already be absolute or relative to the current folder (see
    ``ltune.trainer.paths.resolve_plan_paths``). Raises TrainerInputError with one line:
    a missing or empty file, a malformed JSON line (file:line), a chat record without an
    assistant turn, a missing tokenizer.
    """
    check_tokenizer_dir(plan)
    files = data_files(plan.training.data)
    counts = {"text": 0, "chat": 0}
    for path in files:
        for kind, _, _ in iter_records(path):
            counts[kind] += 1
    return DataSummary(tuple(str(f) for f in files), counts["text"], counts["chat"])


# ---------------------------------------------------------------- tokenization


def load_tokenizer(plan: Plan):
    from transformers import AutoTokenizer

    folder = check_tokenizer_dir(plan)
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=plan.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise TrainerInputError(f"model.tokenizer: cannot load {folder} ({str(e).splitlines()[0]})") from None


def _render(tokenizer, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


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
    full = _render(tokenizer, messages)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
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
