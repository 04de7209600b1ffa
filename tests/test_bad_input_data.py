"""Data files (JSONL), mutated: validate_data accepts, or refuses with one line naming FILE:LINE.

The property that matters: a file the check accepts is one the trainer tokenizes and packs
(ltune/trainer/data.py with the example tokenizer). The check runs on every rank before the
process group; tokenization runs on one rank per node, so a record that passed the check and
then broke the tokenizer killed one rank with a traceback and left the other waiting in gloo.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from pathlib import Path

import pytest
from _fuzz import BAD_BYTES, CASES, DEEP_DOCS, HUGE_INT, mutate_mapping, nasty_scalars, nasty_values, one_line
from _launch import DATA, TOKENIZER
from conftest import make_plan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ltune.job.data_files import validate_data
from ltune.job.errors import TrainerInputError
from ltune.trainer.data import TokenizedData, load_tokenizer, tokenize_files
from ltune.trainer.packing import PackedDataset

TEXTS = [json.loads(line) for line in (DATA / "stories.jsonl").read_text().splitlines()[:20]]
CHATS = [json.loads(line) for line in (DATA / "chat.jsonl").read_text().splitlines()[:20]]
FOLDER = tempfile.TemporaryDirectory(prefix="ltune-bad-data-")
PATH = Path(FOLDER.name) / "d.jsonl"
PLAN = make_plan(model={"tokenizer": str(TOKENIZER)}, training={"seq_len": 64, "max_steps": 1, "data": [str(PATH)]})
_TOKENIZER = []



def fuzz(max_examples: int):
    """Deterministic hypothesis settings (CI reruns the same cases)."""
    return settings(deadline=None, derandomize=True, max_examples=max_examples, suppress_health_check=list(HealthCheck))


#: strings a tokenizer cannot take, or that only look like text
LONE_SURROGATES = st.sampled_from(["\ud800", "\udfff", "\udc80", "\udbff", "a\ud83d", "\ude00b"])
ROLES = st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "", "ASSISTANT", "{{ x }}", "<|end|>", "\n"]),
                  st.text(max_size=8))
CONTENTS = st.one_of(st.text(max_size=30), nasty_scalars, LONE_SURROGATES,
                     st.sampled_from(["", " ", "\n", "<|end|>", "<s>", "{% raw %}", "{{ bos_token }}", "\x00", "🙂" * 5]))


def tokenizer():
    if not _TOKENIZER:
        _TOKENIZER.append(load_tokenizer(PLAN))
    return _TOKENIZER[0]


def _lines_of(raw: bytes) -> list[str]:
    """The file's lines as the data reader sees them (universal newlines, surrogateescape)."""
    return io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors="surrogateescape").readlines()


def judge(raw: bytes, bad_line: int | None = None) -> TokenizedData | str:
    """validate_data on a file of ``raw`` bytes: the one-line error, or the trainer's tokens.

    An error names the file, and a line of it that is not blank (``bad_line`` when the test
    knows which line it spoiled); whatever is accepted must tokenize, one document per record,
    each with tokens to train on, and pack.
    """
    CASES["data files"] += 1
    PATH.write_bytes(raw)
    try:
        summary = validate_data(PLAN)
    except TrainerInputError as e:
        message = str(e)
        assert one_line(message), repr(message)
        m = re.match(rf"{re.escape(str(PATH))}(?::(\d+))?: \S", message)
        assert m, message
        lines = _lines_of(raw)
        if m.group(1) is None:  # about the whole file: only an empty one
            assert not any(line.strip() for line in lines), message
        else:
            line_no = int(m.group(1))
            assert 1 <= line_no <= len(lines) and lines[line_no - 1].strip(), message
            assert bad_line is None or line_no == bad_line, message
        return message
    tok = tokenizer()
    data = tokenize_files(tok, [PATH])
    assert data.num_docs == summary.num_text + summary.num_chat > 0
    assert int(data.tokens.max()) < len(tok) and int(data.tokens.min()) >= 0
    for start, end in zip(data.doc_offsets[:-1], data.doc_offsets[1:]):
        assert end > start and data.loss_mask[start:end].any()
    packed = PackedDataset(data, seq_len=64, seed=0, pad_token_id=tok.pad_token_id)
    assert len(packed.sample(0)["input_ids"]) == 64
    return data


def _dumps(record, draw) -> bytes:
    """One JSONL line; lone surrogates written as JSON escapes, or (ensure_ascii off) as the
    bytes UTF-8 forbids for them."""
    text = json.dumps(record, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


def _file_with(line: bytes, draw) -> tuple[bytes, int]:
    """``line`` among valid records, and its line number."""
    before = draw(st.integers(0, 2))
    after = draw(st.integers(0, 2))
    lines = [json.dumps(r).encode() for r in TEXTS[:before]] + [line] + [json.dumps(r).encode() for r in CHATS[:after]]
    return b"\n".join(lines) + b"\n", before + 1


def _spoil(text: str, draw) -> str:
    """The text with a lone surrogate or nasty string put in somewhere."""
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(st.one_of(LONE_SURROGATES, st.text(max_size=5))) + text[at:]


@fuzz(200)
@given(st.data())
def test_mutated_text_record(data):
    draw = data.draw
    record = dict(draw(st.sampled_from(TEXTS)))
    action = draw(st.sampled_from(["mapping", "mapping", "spoil", "spoil", "spoil", "value"]))
    if action == "mapping":
        record = mutate_mapping(record, draw)
    elif action == "spoil":
        record["text"] = _spoil(record["text"], draw)
    else:
        record = draw(nasty_values)
    raw, line_no = _file_with(_dumps(record, draw), draw)
    judge(raw, line_no)


def _mutate_turns(turns: list, draw) -> object:
    turns = [dict(t) if isinstance(t, dict) else t for t in turns]
    i = draw(st.integers(0, len(turns) - 1))
    action = draw(st.sampled_from(["role", "role", "content", "content", "content", "turn", "mapping", "drop",
                                   "duplicate", "list"]))
    if action == "role" and isinstance(turns[i], dict):
        turns[i]["role"] = draw(ROLES)
    elif not isinstance(turns[i], dict):
        turns[i] = {"role": "assistant", "content": turns[i]}
    elif action == "content":
        content = turns[i].get("content")
        turns[i]["content"] = _spoil(content, draw) if isinstance(content, str) and draw(st.booleans()) else draw(CONTENTS)
    elif action == "turn":
        turns[i] = draw(nasty_values)
    elif action == "mapping":
        turns[i] = mutate_mapping(turns[i], draw)
    elif action == "drop":
        del turns[i]
    elif action == "duplicate":
        turns.insert(i, dict(turns[i]))
    else:
        return draw(nasty_values)
    return turns


@fuzz(250)
@given(st.data())
def test_mutated_chat_record(data):
    draw = data.draw
    record = dict(draw(st.sampled_from(CHATS)))
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 7)) == 0:
            record = mutate_mapping(record, draw) if isinstance(record, dict) else record
        elif isinstance(record, dict) and isinstance(record.get("messages"), list) and record["messages"]:
            record["messages"] = _mutate_turns(record["messages"], draw)
    raw, line_no = _file_with(_dumps(record, draw), draw)
    judge(raw, line_no)


@fuzz(150)
@given(st.data())
def test_mutated_file(data):
    """Whole files spoiled at the byte level: cut, spliced, re-encoded, joined."""
    draw = data.draw
    records = draw(st.lists(st.sampled_from(TEXTS[:5] + CHATS[:5]), min_size=1, max_size=4))
    raw = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
    for _ in range(draw(st.integers(1, 2))):
        at = draw(st.integers(0, len(raw)))
        if draw(st.booleans()):  # at the start of a line, so that a whole line is what is wrong
            at = raw.rfind(b"\n", 0, at) + 1
        action = draw(st.sampled_from(["cut", "insert", "deep", "line", "flip", "crlf", "bom", "blank", "join", "huge"]))
        if action == "cut":
            raw = raw[:at]
        elif action == "insert":
            raw = raw[:at] + draw(st.sampled_from(BAD_BYTES)) + raw[at:]
        elif action == "deep":
            raw = raw[:at] + draw(st.sampled_from(DEEP_DOCS)).encode() + b"\n" + raw[at:]
        elif action == "line":
            raw = raw[:at] + draw(st.text(max_size=20)).encode("utf-8", "surrogatepass") + b"\n" + raw[at:]
        elif action == "flip" and raw:
            at = min(at, len(raw) - 1)
            raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
        elif action == "crlf":
            raw = raw.replace(b"\n", draw(st.sampled_from([b"\r\n", b"\r", b"\n\n"])))
        elif action == "bom":
            raw = "\ufeff".encode() + raw
        elif action == "blank":
            raw = raw[:at] + draw(st.sampled_from([b"\n", b"   \n", b"\t\n", b"\x0c\n"])) + raw[at:]
        elif action == "join":
            raw = raw.replace(b"\n", b"", 1)
        elif action == "huge":
            raw = raw[:at] + b'{"text": "x", "n": ' + str(HUGE_INT).encode() * draw(st.integers(1, 20)) + b"}\n" + raw[at:]
    judge(raw)


# ---------------------------------------------------------------- the defects, one by one


@pytest.mark.parametrize("line, message", [
    # a JSON escape of a lone surrogate: once accepted, then the tokenizer's TypeError on one rank
    (r'{"text": "Ada saw a \ud800 cat."}', r"d\.jsonl:2: 'text' holds a lone surrogate \('\\ud800' at character 10\)"),
    (r'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\udfff"}]}',
     r"d\.jsonl:2: 'messages\[1\]\.content' holds a lone surrogate"),
    (r'{"messages": [{"role": "\udc00", "content": "hi"}, {"role": "assistant", "content": "ok"}]}',
     r"d\.jsonl:2: 'messages\[0\]\.role' holds a lone surrogate"),
    (r'{"text": "ok", "\ud800": 1}', r"d\.jsonl:2: key '\\ud800' holds a lone surrogate"),
    # not JSON, or not what Python will convert (these raised RecursionError/ValueError tracebacks)
    ('{"text": "ok", "loss": NaN}', r"d\.jsonl:2: not valid JSON \(NaN is not a JSON number\)"),
    ('{"text": "ok", "n": -Infinity}', r"d\.jsonl:2: not valid JSON \(-Infinity is not a JSON number\)"),
    ('{"text": "ok", "n": ' + "7" * 4301 + "}", r"d\.jsonl:2: not valid JSON \(Exceeds the limit \(4300 digits\)"),
    ("[" * 100000, r"d\.jsonl:2: nested too deeply \(more than 100 levels\)"),
    ('{"text": "ok", "a": ' + "[" * 101 + "]" * 101 + "}", r"d\.jsonl:2: nested too deeply \(more than 100 levels\)"),
    # shapes the trainer cannot read
    ('{"text": 5}', r"d\.jsonl:2: 'text' must be a non-empty string"),
    ('{"messages": [["user", "hi"]]}', r"d\.jsonl:2: messages\[0\] must be an object with 'role' and 'content'"),
    ('{"messages": [{"content": "hi"}]}', r"d\.jsonl:2: messages\[0\] needs a 'role' string"),
    ('{"messages": [{"role": "assistant", "content": null}]}', r"d\.jsonl:2: message content must be a string \(messages\[0\], role 'assistant'\)"),
    ('{"messages": []}', r"d\.jsonl:2: 'messages' must be a non-empty list"),
])
def test_reported_defects(line, message):
    got = judge(b'{"text": "fine"}\n' + line.encode() + b"\n", bad_line=2)
    assert isinstance(got, str) and re.search(message, got), got


@pytest.mark.parametrize("line", [
    r'{"text": "a pair is one character: \ud83d\ude00"}',  # a surrogate pair is a real character
    r'{"text": "an escaped backslash: \\ud800"}',  # the six characters \ud800, not an escape
    '{"text": "ok", "a": ' + "[" * 99 + "]" * 99 + "}",  # 100 levels: the limit
    '{"text": "ok", "n": ' + "7" * 4300 + "}",
    '{"messages": [{"role": "reviewer", "content": ""}, {"role": "assistant", "content": "<|end|>"}]}',
])
def test_odd_but_valid_records_are_trained_on(line):
    got = judge(b'{"text": "fine"}\n' + line.encode() + b"\n")
    assert isinstance(got, TokenizedData) and got.num_docs == 2, got
