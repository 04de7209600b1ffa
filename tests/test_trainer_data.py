"""Data: record checks (one-line errors naming file:line), chat masks, cache, packing, sharding."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from _launch import DATA, REPO, TOKENIZER, tiny_plan_dict, write_plan

from ltune.job.constants import IGNORE_INDEX
from ltune.job.data_files import iter_records, validate_data
from ltune.job.errors import TrainerInputError
from ltune.trainer.data import TokenizedData, load_or_tokenize, load_tokenizer, tokenize_record
from ltune.trainer.packing import PackedDataset, pack_documents, shard_indices


def _plan(plan_factory, data, tokenizer=str(TOKENIZER)):
    return plan_factory(model={"tokenizer": tokenizer}, training={"seq_len": 64, "max_steps": 1, "data": data})


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "lines,message",
    [
        ([], "data file is empty"),
        (['{"text": "ok"}', '{"text": "broken'], r"bad\.jsonl:2: malformed JSON"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], r"bad\.jsonl:1: chat record has no assistant turn"),
        (['{"prompt": "x"}'], r"bad\.jsonl:1: record has neither 'text' nor 'messages'"),
        (['["a"]'], r"bad\.jsonl:1: expected a JSON object"),
        (['{"text": ""}'], r"bad\.jsonl:1: 'text' must be a non-empty string"),
    ],
)
def test_bad_records_are_one_line_errors(plan_factory, tmp_path, lines, message):
    bad = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(TrainerInputError, match=message) as err:
        validate_data(_plan(plan_factory, [bad]))
    assert "\n" not in str(err.value)


def test_utf8_reads_exactly_and_other_bytes_name_their_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_bytes('{"text": "café 日本 🙂"}\n'.encode("utf-8"))
    assert [record for _, _, record in iter_records(good)] == [{"text": "café 日本 🙂"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')  # latin-1 e-acute on line 3
    with pytest.raises(TrainerInputError, match=r"bad\.jsonl:3: not UTF-8 text$"):
        list(iter_records(bad))


def test_missing_inputs(plan_factory, tmp_path):
    with pytest.raises(TrainerInputError, match="data file not found"):
        validate_data(_plan(plan_factory, [str(tmp_path / "nope.jsonl")]))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(TrainerInputError, match="holds no \\*.jsonl"):
        validate_data(_plan(plan_factory, [str(tmp_path / "empty_dir")]))
    with pytest.raises(TrainerInputError, match="model.tokenizer: folder .* not found"):
        validate_data(_plan(plan_factory, [str(DATA)], tokenizer=str(tmp_path / "no_tok")))
    with pytest.raises(TrainerInputError, match="holds no tokenizer"):
        validate_data(_plan(plan_factory, [str(DATA)], tokenizer=str(tmp_path)))


def test_example_data_validates(plan_factory):
    summary = validate_data(_plan(plan_factory, [str(DATA)]))
    assert summary.num_text > 0 and summary.num_chat > 0
    assert len(summary.files) == 2


def test_trainer_exits_2_with_one_line(tmp_path):
    """Bad data stops `python -m ltune.trainer` while its records are tokenized, before any
    model is built: exit 2, one line (a 1-process world: the records are checked once per run,
    each rank its share, after the process group is joined)."""
    from conftest import free_port

    bad = _write(tmp_path / "bad.jsonl", ['{"text": "fine"}', "{oops"])
    run_dir = tmp_path / "run"
    write_plan(run_dir / "plan.yaml", tiny_plan_dict(layout={"num_gpus": 1}, training={"data": [bad]}))
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LTUNE_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "ltune.trainer", str(run_dir)], capture_output=True, text=True,
                         cwd=REPO, timeout=120, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("ltune.trainer: error:")]
    assert errors == [f"ltune.trainer: error: {bad}:2: malformed JSON (Expecting property name enclosed in double quotes)"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["plan.yaml"]


# ------------------------------------------------------------------ tokenization


def test_chat_loss_only_on_assistant_turns():
    from ltune.planner.schema import Plan

    tok = load_tokenizer(Plan.model_validate(tiny_plan_dict()))
    record = {
        "messages": [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": "What is 2 plus 3?"},
            {"role": "assistant", "content": "2 plus 3 is 5."},
            {"role": "user", "content": "And 4 plus 4?"},
            {"role": "assistant", "content": "4 plus 4 is 8."},
        ]
    }
    ids, mask = tokenize_record(tok, "chat", record, "x:1")
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "2 plus 3 is 5.<|end|>\n4 plus 4 is 8.<|end|>\n"
    assert tok.decode(ids).startswith("<s><|system|>\nYou add numbers.<|end|>\n<|user|>")
    text_ids, text_mask = tokenize_record(tok, "text", {"text": "Ada saw a cat."}, "x:2")
    assert text_ids[0] == tok.bos_token_id and text_ids[-1] == tok.eos_token_id and all(text_mask)


def test_tokenization_cache_is_reused_and_keyed_by_content(plan_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("LTUNE_CACHE_DIR", str(tmp_path / "cache"))
    data = _write(tmp_path / "d.jsonl", ['{"text": "Ada saw a cat."}', '{"text": "Ben fed a dog."}'])
    plan = _plan(plan_factory, [data])
    first, cached = load_or_tokenize(plan)
    assert not cached and first.num_docs == 2
    again, cached = load_or_tokenize(plan)
    assert cached and np.array_equal(again.tokens, first.tokens)
    _write(tmp_path / "d.jsonl", ['{"text": "Ada saw a cat."}', '{"text": "Ben fed a goat."}'])
    changed, cached = load_or_tokenize(plan)
    assert not cached and not np.array_equal(changed.tokens, first.tokens)


# ------------------------------------------------------------------ packing and sharding


def _tokenized(lengths):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.arange(offsets[-1], dtype=np.int32) % 500 + 3
    mask = np.ones(offsets[-1], dtype=bool)
    mask[offsets[1] : offsets[1] + 2] = False  # doc 1: no loss on its first two tokens
    return TokenizedData(tokens, mask, offsets)


def test_pack_documents_exact_length_and_split_count():
    lengths = np.array([100, 200, 300, 50, 256])
    packed = pack_documents(lengths, 256, np.arange(5))
    assert packed.num_split_docs == 1  # only the 300-token document
    used = [sum(seg[2] for seg in seq) for seq in packed.sequences]
    assert all(u <= 256 for u in used)
    assert sum(used) == lengths.sum()
    assert packed.num_padding_tokens == 256 * len(packed.sequences) - lengths.sum()
    pieces = [seg for seq in packed.sequences for seg in seq if seg[0] == 2]
    assert pieces == [(2, 0, 256), (2, 256, 44)]


def test_packed_samples(plan_factory):
    data = _tokenized([40, 30, 70, 10])
    ds = PackedDataset(data, seq_len=64, seed=3, pad_token_id=0)
    for index in range(ds.sequences_per_epoch):
        sample = ds.sample(index)
        assert all(len(v) == 64 for v in sample.values())
        pos = sample["position_ids"]
        starts = np.flatnonzero(pos == 0)
        for a, b in zip(starts, list(starts[1:]) + [64]):
            assert np.array_equal(pos[a:b], np.arange(b - a))  # restarts at every document
    total_loss_tokens = sum((ds.sample(i)["labels"] != IGNORE_INDEX).sum() for i in range(ds.sequences_per_epoch))
    assert total_loss_tokens == 150 - 2
    # deterministic given the seed; another epoch is another order
    again = PackedDataset(data, seq_len=64, seed=3)
    assert all(np.array_equal(ds.sample(i)["input_ids"], again.sample(i)["input_ids"]) for i in range(8))
    orders = {tuple(seg[0] for seq in ds.epoch(e).sequences for seg in seq) for e in range(6)}
    assert len(orders) > 1


def test_shards_are_disjoint_and_sp_groups_share():
    kw = dict(micro_batch_size=2, grad_accum=3)
    seen = []
    for step in range(2):
        for micro in range(3):
            for dp_rank in range(4):
                seen += shard_indices(step, micro, dp_rank=dp_rank, dp_size=4, **kw)
    assert sorted(seen) == list(range(2 * 3 * 4 * 2))
    # ranks 0,1 form one sp group (sp 2): both have dp_rank 0 -> the same sequences
    assert shard_indices(1, 2, dp_rank=0 // 2, dp_size=2, **kw) == shard_indices(1, 2, dp_rank=1 // 2, dp_size=2, **kw)


def test_layouts_not_supported_yet_are_refused(plan_factory):
    from ltune.trainer.data import check_supported

    plan = plan_factory(model={"tokenizer": str(TOKENIZER)}, layout={"sp_degree": 2, "attention": "eager"}, training={"seq_len": 64, "max_steps": 1, "data": [str(DATA)]})
    with pytest.raises(TrainerInputError, match=r"layout.sp_degree \(2\) needs attention 'varlen'"):
        check_supported(plan)
    check_supported(plan_factory(layout={"sp_degree": 2}))
    validate_data(plan)  # the data itself is fine: the launcher may still plan such layouts
    check_supported(plan_factory(layout={"loss": "chunked"}))


def test_a_chat_template_that_refuses_a_conversation_is_a_one_line_error():
    """Templates may raise (e.g. 'roles must alternate'); the record's file:line is named, no traceback."""
    from ltune.planner.schema import Plan

    tok = load_tokenizer(Plan.model_validate(tiny_plan_dict()))
    tok.chat_template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}x"
    record = {"messages": [{"role": "assistant", "content": "hi"}]}
    with pytest.raises(TrainerInputError) as err:
        tokenize_record(tok, "chat", record, "d.jsonl:7")
    assert str(err.value) == "d.jsonl:7: the tokenizer's chat template refuses this conversation (Conversation roles must alternate)"
