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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..planner.schema import Plan
from .errors import TrainerInputError
from .paths import tokenizer_dir

# Files of which at least one marks a folder as a Hugging Face tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

#: deepest nesting of lists and objects a record may have (chat records need 3; Python's
#: parser gives up near 1,000 levels, at a depth that depends on its caller's stack, so the
#: launcher and the trainer could disagree without a fixed limit)
MAX_NESTING = 100

# a JSON escape of a UTF-16 surrogate (\ud800-\udfff): only these can decode to a lone one
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


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
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise TrainerInputError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if not isinstance(turn.get("role"), str):
            raise TrainerInputError(f"{where}: messages[{i}] needs a 'role' string")
        if not isinstance(turn.get("content"), str):
            raise TrainerInputError(f"{where}: message content must be a string (messages[{i}], role {turn['role']!r})")
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


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _field(path: tuple) -> str:
    """messages[1].content, from the keys and indices leading to a value."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return repr(out) if out.isprintable() else ascii(out)


def check_structure(record, where: str) -> None:
    """Nesting within MAX_NESTING, and no lone surrogate in any string or key.

    JSON may spell a lone UTF-16 surrogate (``"\\ud800"``); Python decodes it to a str that
    is not Unicode text, which a tokenizer refuses (and UTF-8 cannot encode). Walked with a
    stack, not recursion.
    """
    stack = [(record, (), 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth >= MAX_NESTING:
                raise TrainerInputError(f"{where}: nested too deeply (more than {MAX_NESTING} levels)")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key, path + (key,), where, "key")
                stack.append((item, path + (key,), depth + 1))
        elif isinstance(value, str):
            _check_text(value, path, where, "value")


def _check_text(text: str, path: tuple, where: str, what: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        name = _field(path) if path else "the record"
        raise TrainerInputError(
            f"{where}: {'key ' if what == 'key' else ''}{name} holds a lone surrogate "
            f"({ascii(text[e.start])} at character {e.start}), which is not Unicode text"
        ) from None


def parse_line(line: str, where: str):
    """One JSONL line -> its JSON value; a one-line TrainerInputError naming ``where``.

    Refused: malformed JSON, NaN/Infinity (not JSON), integers longer than Python converts
    (4,300 digits), nesting deeper than MAX_NESTING, lone surrogates.
    """
    try:
        record = json.loads(line, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise TrainerInputError(f"{where}: malformed JSON ({e.msg})") from None
    except RecursionError:
        raise TrainerInputError(f"{where}: nested too deeply (more than {MAX_NESTING} levels)") from None
    except ValueError as e:  # NaN/Infinity, or an integer longer than 4,300 digits
        raise TrainerInputError(f"{where}: not valid JSON ({str(e).split(';')[0]})") from None
    if isinstance(record, (dict, list)):
        if _SURROGATE_ESCAPE.search(line) or line.count("[") + line.count("{") > MAX_NESTING:
            check_structure(record, where)
    return record


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
            record = parse_line(line, where)
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
    a missing or empty file, a line (file:line) that is not UTF-8, not JSON (NaN and
    integers over 4,300 digits included), nested deeper than MAX_NESTING, holds a lone
    surrogate or is not a record of the module docstring's shape, a chat record without an
    assistant turn, a missing tokenizer. A record it accepts is one the trainer can tokenize
    (tests/test_bad_input_data.py).
    """
    check_tokenizer_dir(plan)
    files = data_files(plan.training.data)
    counts = {"text": 0, "chat": 0}
    for path in files:
        for kind, _, _ in iter_records(path):
            counts[kind] += 1
    return DataSummary(tuple(str(f) for f in files), counts["text"], counts["chat"])
