"""A plan's data files and the checks they must pass before any process starts (pure Python).

Records are JSON objects, one per line: ``{"text": "..."}`` (loss on every token) or
``{"messages": [{"role": ..., "content": ...}, ...]}`` (rendered with the tokenizer's chat
template, loss on the assistant turns only). A data path is a JSONL file or a folder of them
(``*.jsonl``, recursively, sorted).

The launcher runs ``validate_data`` before it writes the run folder; the trainer runs it
again on the run folder's plan, and reads the records through ``iter_records`` to tokenize
them, so both refuse the same data with the same one-line message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..planner.schema import Plan
from .errors import TrainerInputError
from .paths import tokenizer_dir

# Files of which at least one marks a folder as a Hugging Face tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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
    """(kind, where, record) for every non-blank line of a JSONL file, checked.

    Bytes that are not UTF-8 are decoded as lone surrogates (surrogateescape), so that the
    error names the line that holds them; valid UTF-8 decodes exactly as with strict errors.
    """
    empty = True
    try:
        handle = path.open(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise TrainerInputError(f"{path}: cannot read ({e.strerror})") from None
    with handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            empty = False
            where = f"{path}:{line_no}"
            if not line.isascii():
                try:
                    line.encode("utf-8")
                except UnicodeEncodeError:
                    raise TrainerInputError(f"{where}: not UTF-8 text") from None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainerInputError(f"{where}: malformed JSON ({e.msg})") from None
            yield check_record(record, where), where, record
    if empty:
        raise TrainerInputError(f"{path}: data file is empty")


def check_tokenizer_dir(plan: Plan) -> Path:
    """The plan's tokenizer folder, checked to exist and to hold a tokenizer file."""
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


@dataclass(frozen=True)
class DataSummary:
    files: tuple[str, ...]
    num_text: int
    num_chat: int


def validate_data(plan: Plan) -> DataSummary:
    """Check the plan's data files and tokenizer folder without tokenizing.

    Paths must already be absolute or relative to the current folder (see
    ``ltune.job.paths.resolve_plan_paths``). Raises TrainerInputError with one line:
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
