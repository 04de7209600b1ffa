"""Tokenized data at corpus scale: streamed, sharded, memory-mapped, keyed by content.

The reference for "the same result" is the earlier in-memory implementation, kept below as
``reference_tokenize``: every record read in text mode by ``iter_records`` and tokenized
alone by ``tokenize_record``. Ranks are simulated by threads with a small all-gather
(``ThreadComm``), so no process group is needed.
"""

from __future__ import annotations

import json
import os
import random
import threading

import numpy as np
import pytest
from _launch import DATA, TOKENIZER
from conftest import make_plan

from ltune.job.data_files import data_files, iter_records
from ltune.job.errors import TrainerInputError
from ltune.trainer import data as D
from ltune.trainer.packing import PackedDataset

ARRAYS = ("tokens", "loss_mask", "doc_offsets")


def _plan(paths, seq_len=64):
    return make_plan(model={"tokenizer": str(TOKENIZER)}, training={"seq_len": seq_len, "max_steps": 1, "data": [str(p) for p in paths]})


@pytest.fixture(scope="module")
def tok():
    return D.load_tokenizer(_plan([DATA]))


def reference_tokenize(tokenizer, files) -> D.TokenizedData:
    """The earlier implementation (ltune/trainer/data.py tokenize_files): Python lists of every record's tokens."""
    tokens, mask, offsets = [], [], [0]
    for path in files:
        for kind, where, record in iter_records(path):
            ids, m = D.tokenize_record(tokenizer, kind, record, where)
            tokens.extend(ids)
            mask.extend(m)
            offsets.append(len(tokens))
    return D.TokenizedData(np.asarray(tokens, dtype=np.int32), np.asarray(mask, dtype=bool), np.asarray(offsets, dtype=np.int64))


def _same(a: D.TokenizedData, b: D.TokenizedData) -> None:
    for key in ARRAYS:
        x, y = getattr(a, key), getattr(b, key)
        assert x.dtype == y.dtype and np.array_equal(x, y), key


def generated_corpus(folder, records=400, seed=1):
    """Three files of the example stories' sentences recombined and the example chats, with CRLF and
    LF endings, a lone CR between records, blank lines and non-ASCII text."""
    sentences = [s.strip() + "." for line in (DATA / "stories.jsonl").read_text().splitlines()
                 for s in json.loads(line)["text"].split(".") if s.strip()]
    chats = (DATA / "chat.jsonl").read_text().splitlines()
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        lines = []
        for _ in range(records // 3):
            if rng.random() < 0.3:
                lines.append(rng.choice(chats))
            else:
                text = " ".join(rng.choices(sentences, k=rng.randint(1, 12)))
                if rng.random() < 0.1:
                    text += " café 日本 🙂"
                lines.append(json.dumps({"text": text}, ensure_ascii=rng.random() < 0.5))
        ends = [rng.choice(["\n", "\n", "\r\n", "\n\n", "\r"]) for _ in lines]
        (folder / f"f{i}.jsonl").write_bytes("".join(a + b for a, b in zip(lines, ends)).encode())
    return folder


class ThreadComm:
    """``size`` ranks as threads: all_gather through a shared list and a barrier."""

    def __init__(self, rank, shared):
        self.rank, self.size, self._shared = rank, shared["size"], shared

    def all_gather(self, obj):
        slots, barrier = self._shared["slots"], self._shared["barrier"]
        slots[self.rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()  # nobody overwrites a slot before everyone has read them
        return out


def run_ranks(size, fn):
    """fn(comm) on ``size`` thread-ranks; their results (or exceptions), in rank order."""
    shared = {"size": size, "slots": [None] * size, "barrier": threading.Barrier(size, timeout=120)}
    results = [None] * size

    def body(rank):
        try:
            results[rank] = fn(ThreadComm(rank, shared))
        except BaseException as e:  # noqa: BLE001 (reported to the test)
            results[rank] = e

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


# ------------------------------------------------------------------ the same result as before


@pytest.mark.parametrize("corpus", ["example", "generated"])
def test_same_arrays_and_packed_stream_as_before(tok, tmp_path, monkeypatch, corpus):
    folder = DATA if corpus == "example" else generated_corpus(tmp_path / "corpus")
    files = data_files([str(folder)])
    ref = reference_tokenize(tok, files)
    _same(ref, D.tokenize_files(tok, files))
    monkeypatch.setenv("LTUNE_CACHE_DIR", str(tmp_path / "cache"))
    cached, from_cache = D.load_or_tokenize(_plan([folder]), tok)
    assert not from_cache and isinstance(cached.tokens, np.memmap)
    _same(ref, cached)
    assert cached.max_token() == int(ref.tokens.max())
    # the packed stream is a function of (seed, index) over the arrays: the same sequences
    old, new = PackedDataset(ref, 64, seed=5), PackedDataset(cached, 64, seed=5)
    per_epoch = old.sequences_per_epoch
    for index in list(range(0, 3 * per_epoch, max(1, per_epoch // 7))) + [per_epoch - 1, per_epoch]:
        a, b = old.sample(index), new.sample(index)
        assert all(np.array_equal(a[k], b[k]) for k in a), index


def test_byte_ranges_split_every_file_into_the_same_records(tmp_path):
    """Any cut point: the records (and their file:line) of [0, cut) then [cut, end) are iter_records' records."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\r\n\n{"text": "b\\u00e9"}\r{"text": "c"}\n  \n{"messages": [{"role": "assistant", "content": "x"}]}\n{"text": "\xc3\xa9t\xc3\xa9"}')
    expected = [(kind, str(where), record) for kind, where, record in iter_records(path)]
    size = path.stat().st_size
    for cut in range(size + 1):
        got = [(k, str(w), r) for lo, hi in ((0, cut), (cut, size)) for k, w, r in D.iter_records_range(path, lo, hi)]
        assert got == expected, cut


def test_an_error_in_a_later_shard_names_the_same_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\r\n\n{"text": "also fine"}\n{"text": "broken\n')
    with pytest.raises(TrainerInputError) as serial:
        list(iter_records(path))
    with pytest.raises(TrainerInputError) as sharded:
        list(D.iter_records_range(path, 20, path.stat().st_size))
    assert str(sharded.value) == str(serial.value) == f"{path}:4: malformed JSON (Invalid control character at)"


@pytest.mark.parametrize("size", [2, 3])
def test_ranks_writing_parts_give_the_same_arrays(tok, tmp_path, size):
    """Each rank tokenizes its byte range into a part (small chunks), copies it to its offset: the solo arrays."""
    files = data_files([str(generated_corpus(tmp_path / "corpus"))])
    total = sum(f.stat().st_size for f in files)
    out = tmp_path / "cache"
    parts = [D.write_part(tok, files, *D.shard_range(total, r, size), D._part_dir(out, r), chunk_records=5) for r in range(size)]
    assert all(p.num_docs > 0 for p in parts)
    D.create_arrays(out, parts)
    for r in reversed(range(size)):  # in any order
        D.copy_part(out, r, parts)
    D.write_meta(out, files, parts)
    assert sorted(p.name for p in out.iterdir()) == ["doc_offsets.bin", "loss_mask.bin", "meta.json", "tokens.bin"]
    _same(reference_tokenize(tok, files), D.open_cache(out))


def test_thread_ranks_prepare_one_cache_together(tmp_path, monkeypatch):
    folder = generated_corpus(tmp_path / "corpus")
    monkeypatch.setenv("LTUNE_CACHE_DIR", str(tmp_path / "cache"))
    plan = _plan([folder])
    results = run_ranks(3, lambda comm: D.load_or_tokenize(plan, None, comm))
    assert [cached for _, cached in results] == [False] * 3
    ref = reference_tokenize(D.load_tokenizer(plan), data_files([str(folder)]))
    for data, _ in results:
        _same(ref, data)
    assert len(list(D.cache_root().iterdir())) == 1  # the folder, no temporary one left
    again = run_ranks(2, lambda comm: D.load_or_tokenize(plan, None, comm))
    assert [cached for _, cached in again] == [True] * 2


def test_a_bad_record_on_one_rank_is_the_same_error_on_every_rank(tmp_path, monkeypatch):
    """The first bad record in file order (an all-blank file before it counts), named alike by every rank."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("".join(json.dumps({"text": f"story {i}"}) + "\n" for i in range(50)))
    (tmp_path / "d" / "b.jsonl").write_text("\n \n")
    (tmp_path / "d" / "c.jsonl").write_text('{"text": "ok"}\n{oops\n')
    monkeypatch.setenv("LTUNE_CACHE_DIR", str(tmp_path / "cache"))
    plan = _plan([tmp_path / "d"])
    with pytest.raises(TrainerInputError) as serial:
        reference_tokenize(D.load_tokenizer(plan), data_files([str(tmp_path / "d")]))
    assert "b.jsonl: data file is empty" in str(serial.value)
    results = run_ranks(2, lambda comm: D.load_or_tokenize(plan, None, comm))
    assert all(isinstance(e, TrainerInputError) and str(e) == str(serial.value) for e in results), results
    (tmp_path / "d" / "b.jsonl").write_text('{"text": "now b has one"}\n')
    with pytest.raises(TrainerInputError) as serial:
        reference_tokenize(D.load_tokenizer(plan), data_files([str(tmp_path / "d")]))
    results = run_ranks(2, lambda comm: D.load_or_tokenize(plan, None, comm))
    assert all(isinstance(e, TrainerInputError) and str(e) == str(serial.value) for e in results), results
    assert str(serial.value).endswith("c.jsonl:2: malformed JSON (Expecting property name enclosed in double quotes)")
    assert not (tmp_path / "cache").exists() or not any(D.cache_root().iterdir())  # no temporary folder left


# ------------------------------------------------------------------ memory maps


def test_the_cache_is_memory_mapped_and_read_only_what_is_touched(tmp_path):
    """40 MB of tokens: opening the cache and reading a packed sample keeps resident memory far below it."""
    n_docs, doc_len = 1000, 10_000
    folder = tmp_path / "c"
    folder.mkdir()
    (np.arange(n_docs * doc_len, dtype=np.int32) % 500).tofile(folder / "tokens.bin")
    np.ones(n_docs * doc_len, dtype=np.uint8).tofile(folder / "loss_mask.bin")
    np.arange(0, n_docs * doc_len + 1, doc_len, dtype=np.int64).tofile(folder / "doc_offsets.bin")
    D.write_meta(folder, [], [D.PartInfo(n_docs * doc_len, n_docs, 499, [])])

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    data = D.open_cache(folder)
    ds = PackedDataset(data, seq_len=4096, seed=0)
    sample = ds.sample(7)
    grown = rss() - before
    assert isinstance(data.tokens, np.memmap) and not data.tokens.flags.writeable
    assert data.max_token() == 499 and len(sample["input_ids"]) == 4096
    assert grown < 8 << 20, grown  # the file is 40 MB (+10 MB of mask)
    with pytest.raises(ValueError):
        data.tokens[0] = 1


def test_a_cache_file_of_the_wrong_size_is_refused(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    np.arange(10, dtype=np.int32).tofile(folder / "tokens.bin")
    np.ones(10, dtype=np.uint8).tofile(folder / "loss_mask.bin")
    np.array([0, 4, 10], dtype=np.int64).tofile(folder / "doc_offsets.bin")
    D.write_meta(folder, [], [D.PartInfo(10, 2, 9, [])])
    assert D.open_cache(folder).num_docs == 2
    with (folder / "tokens.bin").open("ab") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(TrainerInputError, match=r"tokens.bin holds 44 bytes, expected 40"):
        D.open_cache(folder)


# ------------------------------------------------------------------ the cache key


def test_cache_is_reused_and_rebuilt_when_content_changes_with_size_and_mtime_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("LTUNE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "Ada saw a cat."}\n{"text": "Ben fed a dog."}\n')
    plan = _plan([path])
    first, cached = D.load_or_tokenize(plan)
    assert not cached
    again, cached = D.load_or_tokenize(plan)
    assert cached
    _same(first, again)
    stat = path.stat()
    path.write_text('{"text": "Ada saw a cat."}\n{"text": "Ben fed a hog."}\n')  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    changed, cached = D.load_or_tokenize(plan)
    assert not cached and not np.array_equal(changed.tokens, first.tokens)
    assert len(list(D.cache_root().iterdir())) == 2


def test_key_hashes_each_block_once_and_does_not_depend_on_the_rank_count(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "HASH_BLOCK_BYTES", 1000)
    files = data_files([str(generated_corpus(tmp_path / "corpus"))])
    read = []
    real = D.digest_blocks
    monkeypatch.setattr(D, "digest_blocks", lambda paths, blocks: read.append(list(blocks)) or real(paths, blocks))
    keys = {size: run_ranks(size, lambda comm: D.cache_key(files, TOKENIZER, comm)) for size in (1, 2, 3)}
    assert len({k for ks in keys.values() for k in ks}) == 1, keys
    blocks = D.hash_blocks(files + sorted(p for p in TOKENIZER.iterdir() if p.is_file()))
    assert len(blocks) > 100
    # every block hashed by exactly one of the 3 ranks (the last run's three calls)
    assert sorted(b for part in read[-3:] for b in part) == sorted(blocks)
    # one byte changed, in the last block of the corpus: another key
    raw = bytearray(files[-1].read_bytes())
    raw[-3] = ord("X") if raw[-3] != ord("X") else ord("Y")
    files[-1].write_bytes(bytes(raw))
    assert D.cache_key(files, TOKENIZER) != keys[1][0]


# ------------------------------------------------------------------ atomic, unique writers


def test_temporary_names_are_unique_and_name_host_and_process():
    import socket

    names = {D.temp_name("k") for _ in range(100)}
    assert len(names) == 100
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())
    assert all(n.startswith(f"k.tmp.{host}.{os.getpid()}.") for n in names)


def test_two_writers_one_result(tmp_path):
    folder = tmp_path / "key"
    tmps = []
    for i in range(2):
        tmp = tmp_path / D.temp_name("key")
        tmp.mkdir()
        (tmp / "tokens.bin").write_bytes(bytes([i]))
        (tmp / D.META_FILE).write_text("{}")
        tmps.append(tmp)
    assert D.publish(tmps[0], folder) is True
    assert D.publish(tmps[1], folder) is False  # lost the race: uses the winner's folder
    assert (folder / "tokens.bin").read_bytes() == b"\0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


def test_concurrent_jobs_race_to_the_same_cache(tmp_path, monkeypatch):
    """Two single-process jobs at once (threads, each its own tokenizer): both get the data, one folder remains."""
    folder = generated_corpus(tmp_path / "corpus", records=150)
    monkeypatch.setenv("LTUNE_CACHE_DIR", str(tmp_path / "cache"))
    plan = _plan([folder])
    start = threading.Barrier(2)

    def job(_comm):
        start.wait()
        return D.load_or_tokenize(plan, None, D.SoloComm())

    results = run_ranks(2, job)
    assert all(isinstance(r, tuple) for r in results), results
    _same(results[0][0], results[1][0])
    assert len(list(D.cache_root().iterdir())) == 1


# ------------------------------------------------------------------ packing, held in arrays


def reference_pack(doc_lengths, seq_len, order):
    """The earlier implementation (ltune/trainer/packing.py pack_documents): lists of (doc, start, length) tuples."""
    sequences, current, used, split, padding = [], [], 0, 0, 0
    for doc in order:
        length = int(doc_lengths[doc])
        split += length > seq_len
        start = 0
        while start < length:
            piece = min(seq_len, length - start)
            if used + piece > seq_len:
                padding += seq_len - used
                sequences.append(current)
                current, used = [], 0
            current.append((int(doc), start, piece))
            used += piece
            start += piece
            if used == seq_len:
                sequences.append(current)
                current, used = [], 0
    if current:
        padding += seq_len - used
        sequences.append(current)
    return sequences, split, padding


def test_packed_epochs_are_todays_and_a_shorter_epoch_does_not_end_the_stream(tok, monkeypatch):
    from ltune.trainer import packing

    data = D.tokenize_files(tok, data_files([str(DATA)]))
    for seq_len in (16, 128, 300):
        order = np.random.default_rng(seq_len).permutation(data.num_docs)
        packed = packing.pack_documents(data.doc_lengths, seq_len, order)
        assert (list(packed.sequences), packed.num_split_docs, packed.num_padding_tokens) == reference_pack(data.doc_lengths, seq_len, order)
    # seq_len 128, seed 0: epoch 0 packs into 972 sequences, epoch 1 into 965
    calls = []
    real = packing.pack_documents
    monkeypatch.setattr(packing, "pack_documents", lambda *a: calls.append(1) or real(*a))
    ds = PackedDataset(data, 128, seed=0)
    per_epoch = ds.sequences_per_epoch
    assert (per_epoch, len(ds.epoch(1).sequences)) == (972, 965)
    before = len(calls)
    for index in range(per_epoch + 960, 2 * per_epoch):  # the last 7 were an IndexError
        assert len(ds.sample(index)["input_ids"]) == 128
    assert len(calls) == before  # epoch 1 packed once, epoch 0 not again
    assert np.array_equal(ds.sample(2 * per_epoch - 1)["input_ids"], ds.sample(per_epoch + (per_epoch - 1) % 965)["input_ids"])


# ------------------------------------------------------------------ the process group's timeout


def test_the_plan_sets_the_process_group_timeout(monkeypatch):
    from datetime import timedelta

    import deepspeed

    from ltune.trainer import engine

    plan = _plan([DATA])
    assert plan.training.collective_timeout_minutes == 30
    seen = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.append(kw))
    monkeypatch.setattr(engine, "share_cpu_threads", lambda: None)
    engine.init_distributed(plan.training.collective_timeout_minutes)
    engine.init_distributed(2.5)
    assert seen == [{"timeout": timedelta(minutes=30)}, {"timeout": timedelta(seconds=150)}]
    with pytest.raises(ValueError, match="collective_timeout_minutes"):
        make_plan(training={"collective_timeout_minutes": 0})
