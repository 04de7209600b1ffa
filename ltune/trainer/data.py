"""Training data: chat rendering, tokenization and its cache (records read and checked by
``ltune.job.data_files``, shared with the launcher).

Records are JSON objects, one per line: ``{"text": "..."}`` (loss on every token) or
``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered with the tokenizer's
chat template, loss on the assistant turns only.

Tokenized data lives in a cache folder keyed by the inputs' contents (``cache_key``): flat
token, loss-mask and document-offset files written in chunks by the ranks together and
memory-mapped by every rank (``load_or_tokenize``).

This module imports no torch (torch.distributed only inside ``TorchComm``, ``cache_comm``);
transformers is imported only to tokenize.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from ..job.data_files import check_record, check_tokenizer_dir, data_files, parse_line
from ..planner.schema import Plan
from .errors import TrainerInputError

CACHE_FORMAT_VERSION = 2
META_FILE = "meta.json"
#: file name and dtype of each array in a cache folder (flat, raw, little-endian)
ARRAYS = {"tokens": ("tokens.bin", np.dtype("<i4")), "loss_mask": ("loss_mask.bin", np.dtype("u1")),
          "doc_offsets": ("doc_offsets.bin", np.dtype("<i8"))}
#: records tokenized per tokenizer call, and written per chunk: what a rank holds at once
CHUNK_RECORDS = 256
#: bytes copied per read when parts are assembled
COPY_BYTES = 1 << 20
#: bytes per hashed block; ranks hash disjoint runs of blocks, so the key costs one read of the corpus per run
HASH_BLOCK_BYTES = 64 << 20

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


# ---------------------------------------------------------------- tokenized arrays


@dataclass
class TokenizedData:
    """All documents, concatenated: token ids, loss mask, and document offsets.

    From the cache the three arrays are read-only memory maps: a rank holds in memory only
    the pages it reads. ``max_token_id`` comes from the cache's meta.json (counted while
    writing), so checking it against the vocabulary reads no token.
    """

    tokens: np.ndarray  # int32 (total_tokens,)
    loss_mask: np.ndarray  # bool (total_tokens,)
    doc_offsets: np.ndarray  # int64 (num_docs + 1,)
    max_token_id: int | None = None

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)

    def max_token(self) -> int:
        """The largest token id (-1 for no tokens), from the meta when known."""
        if self.max_token_id is not None:
            return self.max_token_id
        return int(self.tokens.max()) if len(self.tokens) else -1


# ---------------------------------------------------------------- reading a byte range of the corpus


def shard_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of ``total`` items that rank ``rank`` of ``world`` takes: contiguous, in rank order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank ({rank}) must be in [0, world ({world}))")
    return total * rank // world, total * (rank + 1) // world


def file_ranges(sizes: list[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(file index, start, end) byte ranges of the files' concatenation that overlap [lo, hi)."""
    out, base = [], 0
    for i, size in enumerate(sizes):
        a, b = max(lo, base), min(hi, base + size)
        if a < b:
            out.append((i, a - base, b - base))
        base += size
    return out


def _text_lines(handle, pos: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, bytes) of the lines, as text mode splits them (\\n, \\r\\n, lone \\r), of the
    binary lines starting at ``pos`` (a line start) and before ``end``."""
    while pos < end:
        raw = handle.readline()
        if not raw:
            return
        start, pos = pos, pos + len(raw)
        if b"\r" not in raw:
            yield start, raw
            continue
        i, n = 0, len(raw)
        while i < n:
            j = raw.find(b"\r", i)
            if j == -1:
                yield start + i, raw[i:]
                break
            k = j + 2 if raw[j + 1 : j + 2] == b"\n" else j + 1
            yield start + i, raw[i:k]
            i = k


class _Where:
    """``path:line`` of a record read from the middle of a file: the line number is counted
    (from the file's start) only when an error message needs it."""

    def __init__(self, path: Path, offset: int):
        self.path, self.offset = path, offset

    def __str__(self) -> str:
        with self.path.open("rb") as f:
            line_no = sum(1 for start, _ in _text_lines(f, 0, self.offset) if start < self.offset) + 1
        return f"{self.path}:{line_no}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def iter_records_range(path: Path, start: int, end: int) -> Iterator[tuple[str, object, dict]]:
    """(kind, where, record) of the non-blank lines of ``path`` that start in bytes [start, end).

    The same records, checks and one-line errors as ``ltune.job.data_files.iter_records``
    (universal newlines, UTF-8), for one shard of a file; the ranges of consecutive shards
    split every file's lines exactly once.
    """
    try:
        handle = path.open("rb")
    except OSError as e:
        raise TrainerInputError(f"{path}: cannot read ({e.strerror})") from None
    with handle:
        pos = 0
        if start > 0:  # the first line starting at or after `start`
            handle.seek(start - 1)
            pos = start - 1 + len(handle.readline())
        line_no = 0 if start == 0 else None
        for offset, raw in _text_lines(handle, pos, end):
            if line_no is not None:
                line_no += 1
            if not raw.strip():
                continue
            where = f"{path}:{line_no}" if line_no is not None else _Where(path, offset)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TrainerInputError(f"{where}: not UTF-8 text") from None
            record = parse_line(line, where)
            yield check_record(record, where), where, record


# ---------------------------------------------------------------- tokenizing in chunks

@dataclass
class Chunk:
    """Consecutive documents of one file, tokenized."""

    file_index: int
    tokens: np.ndarray  # int32
    loss_mask: np.ndarray  # bool
    lengths: np.ndarray  # int64, one per document


def _encode(tokenizer, file_index: int, batch: list[tuple[str, object, dict]]) -> Chunk:
    """One chunk: text records in one batched tokenizer call (as ``tokenize_record`` does them one
    by one: the same ids), chat records through ``tokenize_record``."""
    texts = [record["text"] for kind, _, record in batch if kind == "text"]
    kwargs = dict(add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
    encoded = iter(tokenizer(texts, **kwargs)["input_ids"] if texts else [])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids_lists, chat_masks = [], {}
    for i, (kind, where, record) in enumerate(batch):
        if kind == "text":
            ids = next(encoded)
            ids = ([bos] + ids) if bos is not None else list(ids)
            if eos is not None:
                ids.append(eos)
        else:
            ids, chat_masks[i] = tokenize_record(tokenizer, kind, record, where)
        ids_lists.append(ids)
    lengths = np.fromiter((len(ids) for ids in ids_lists), dtype=np.int64, count=len(ids_lists))
    total = int(lengths.sum())
    tokens = np.fromiter(chain.from_iterable(ids_lists), dtype=np.int32, count=total)
    mask = np.ones(total, dtype=bool)
    if chat_masks:
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        for i, m in chat_masks.items():
            mask[starts[i] : starts[i] + lengths[i]] = m
    return Chunk(file_index, tokens, mask, lengths)


def iter_chunks(tokenizer, files: list[Path], lo: int, hi: int, chunk_records: int = CHUNK_RECORDS) -> Iterator[Chunk]:
    """The documents whose lines start in bytes [lo, hi) of the files' concatenation, in order, in chunks.

    An error is raised at the record that causes it, after the records before it are
    tokenized (so that the first bad record in file order is the one named).
    """
    sizes = [path.stat().st_size for path in files]
    for index, start, end in file_ranges(sizes, lo, hi):
        batch: list = []
        records = iter_records_range(files[index], start, end)
        while True:
            try:
                item = next(records)
            except StopIteration:
                break
            except TrainerInputError as e:
                e.file_index = index
                if batch:
                    _encode_in(tokenizer, index, batch)  # an earlier record's error comes first
                raise
            batch.append(item)
            if len(batch) == chunk_records:
                yield _encode_in(tokenizer, index, batch)
                batch = []
        if batch:
            yield _encode_in(tokenizer, index, batch)


def _encode_in(tokenizer, file_index: int, batch: list) -> Chunk:
    try:
        return _encode(tokenizer, file_index, batch)
    except TrainerInputError as e:
        e.file_index = file_index
        raise


def first_error(files: list[Path], docs_per_file: list[int], error: tuple[int, str] | None) -> str | None:
    """The error a serial read of ``files`` meets first: ``error`` (file index, message), or an
    empty file before it (a file without records is an error once it is read to its end)."""
    stop = error[0] if error else len(files)
    for path, count in zip(files[:stop], docs_per_file):
        if count == 0:
            return f"{path}: data file is empty"
    return error[1] if error else None


def tokenize_files(tokenizer, files: list[Path]) -> TokenizedData:
    """All of ``files`` tokenized, in memory (the cache writes the same arrays to disk in chunks)."""
    info = PartInfo(0, 0, -1, [0] * len(files))
    chunks = list(_counted(tokenizer, files, 0, sum(p.stat().st_size for p in files), info, CHUNK_RECORDS))
    message = parts_error(files, [info])
    if message:
        raise TrainerInputError(message)
    lengths = np.concatenate([c.lengths for c in chunks])
    tokens = np.concatenate([c.tokens for c in chunks])
    return TokenizedData(
        tokens,
        np.concatenate([c.loss_mask for c in chunks]),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        int(tokens.max()) if len(tokens) else -1,
    )


# ---------------------------------------------------------------- the cache's files

@dataclass
class PartInfo:
    """What one rank wrote: its documents' token count, document count, largest id, documents per
    file, and the data error that stopped it (file index, message), if any."""

    num_tokens: int
    num_docs: int
    max_token_id: int
    docs_per_file: list[int]
    error: tuple[int, str] | None = None


def parts_error(files: list[Path], parts: list[PartInfo]) -> str | None:
    """The error a serial read meets first, from the parts of consecutive byte ranges (in rank order)."""
    upto = next((r for r, p in enumerate(parts) if p.error), len(parts) - 1)
    docs = [sum(p.docs_per_file[i] for p in parts[: upto + 1]) for i in range(len(files))]
    return first_error(files, docs, parts[upto].error)


def _part_dir(folder: Path, rank: int) -> Path:
    return folder / f"part{rank:05d}"


def write_part(tokenizer, files: list[Path], lo: int, hi: int, out: Path, chunk_records: int = CHUNK_RECORDS) -> PartInfo:
    """Tokenize bytes [lo, hi) of the corpus into ``out``: tokens, loss mask and document end
    offsets (relative to the part), appended chunk by chunk, so memory holds one chunk."""
    out.mkdir(parents=True, exist_ok=True)
    info = PartInfo(0, 0, -1, [0] * len(files))
    names = {key: out / name for key, (name, _) in ARRAYS.items()}
    with names["tokens"].open("wb") as ft, names["loss_mask"].open("wb") as fm, names["doc_offsets"].open("wb") as fo:
        for chunk in _counted(tokenizer, files, lo, hi, info, chunk_records):
            chunk.tokens.astype(ARRAYS["tokens"][1], copy=False).tofile(ft)
            chunk.loss_mask.view(np.uint8).tofile(fm)
            before = info.num_tokens - len(chunk.tokens)  # _counted has counted this chunk already
            (before + np.cumsum(chunk.lengths)).astype(ARRAYS["doc_offsets"][1]).tofile(fo)
    return info


def _counted(tokenizer, files: list[Path], lo: int, hi: int, info: PartInfo, chunk_records: int) -> Iterator[Chunk]:
    """``iter_chunks``, counted into ``info``; a data error ends it, recorded in ``info.error``."""
    try:
        for chunk in iter_chunks(tokenizer, files, lo, hi, chunk_records):
            info.num_tokens += len(chunk.tokens)
            info.num_docs += len(chunk.lengths)
            info.docs_per_file[chunk.file_index] += len(chunk.lengths)
            if len(chunk.tokens):
                info.max_token_id = max(info.max_token_id, int(chunk.tokens.max()))
            yield chunk
    except TrainerInputError as e:
        info.error = (e.file_index, str(e))


def create_arrays(folder: Path, parts: list[PartInfo]) -> None:
    """The cache's flat files at their final sizes (sparse until the parts are copied in)."""
    tokens, docs = sum(p.num_tokens for p in parts), sum(p.num_docs for p in parts)
    for key, count in (("tokens", tokens), ("loss_mask", tokens), ("doc_offsets", docs + 1)):
        name, dtype = ARRAYS[key]
        with (folder / name).open("wb") as f:
            f.truncate(count * dtype.itemsize)
    # doc_offsets[0] = 0: the truncated file already reads as zeros


def _copy_into(src: Path, dst: Path, at_bytes: int, add: int = 0, dtype=None) -> None:
    with src.open("rb") as fin, dst.open("r+b") as fout:
        fout.seek(at_bytes)
        while block := fin.read(COPY_BYTES):
            if add:
                block = (np.frombuffer(block, dtype=dtype) + add).astype(dtype).tobytes()
            fout.write(block)


def copy_part(folder: Path, rank: int, parts: list[PartInfo]) -> None:
    """Copy rank ``rank``'s part into the flat files at its offsets (ranks do this in parallel), then delete it."""
    token_base = sum(p.num_tokens for p in parts[:rank])
    doc_base = sum(p.num_docs for p in parts[:rank])
    part = _part_dir(folder, rank)
    for key, at, add in (("tokens", token_base, 0), ("loss_mask", token_base, 0), ("doc_offsets", 1 + doc_base, token_base)):
        name, dtype = ARRAYS[key]
        _copy_into(part / name, folder / name, at * dtype.itemsize, add, dtype)
    shutil.rmtree(part)


def write_meta(folder: Path, files: list[Path], parts: list[PartInfo]) -> None:
    meta = {
        "format": CACHE_FORMAT_VERSION,
        "files": [str(f) for f in files],
        "num_docs": sum(p.num_docs for p in parts),
        "num_tokens": sum(p.num_tokens for p in parts),
        "max_token_id": max(p.max_token_id for p in parts),
        "arrays": {key: [name, dtype.str] for key, (name, dtype) in ARRAYS.items()},
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=1))


def open_cache(folder: Path) -> TokenizedData:
    """The cache folder's arrays as read-only memory maps (nothing read until used)."""
    meta = json.loads((folder / META_FILE).read_text())
    counts = {"tokens": meta["num_tokens"], "loss_mask": meta["num_tokens"], "doc_offsets": meta["num_docs"] + 1}
    arrays = {}
    for key, (name, dtype) in ARRAYS.items():
        path, count = folder / name, counts[key]
        if path.stat().st_size != count * dtype.itemsize:
            raise TrainerInputError(f"tokenized cache {folder}: {name} holds {path.stat().st_size} bytes, expected {count * dtype.itemsize}")
        arrays[key] = np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)
    return TokenizedData(arrays["tokens"], arrays["loss_mask"].view(bool), arrays["doc_offsets"], meta["max_token_id"])


# ---------------------------------------------------------------- the cache key

def hash_blocks(paths: list[Path]) -> list[tuple[int, int, int]]:
    """(path index, offset, length) of the fixed-size blocks of ``paths`` (an empty file: one empty block)."""
    blocks = []
    for i, path in enumerate(paths):
        size = path.stat().st_size
        blocks += [(i, at, min(HASH_BLOCK_BYTES, size - at)) for at in range(0, size, HASH_BLOCK_BYTES)] or [(i, 0, 0)]
    return blocks


def digest_blocks(paths: list[Path], blocks: list[tuple[int, int, int]]) -> list[str]:
    """sha256 of each block's bytes."""
    out, buf = [], bytearray(1 << 20)
    for i, at, length in blocks:
        h = hashlib.sha256()
        with paths[i].open("rb") as f:
            f.seek(at)
            left = length
            while left:
                n = f.readinto(memoryview(buf)[: min(left, len(buf))])
                if not n:
                    raise TrainerInputError(f"{paths[i]}: changed while it was read (shorter than {at + length} bytes)")
                h.update(memoryview(buf)[:n])
                left -= n
        out.append(h.hexdigest())
    return out


def cache_key(files: list[Path], tokenizer_folder: Path, comm: "Comm | None" = None) -> str:
    """A hash of the data files' paths and contents, the tokenizer folder's files and the format.

    Every byte is hashed, each by one rank (``comm``: ranks take contiguous runs of fixed
    blocks, independent of their count, and share the block digests): any change of a
    file's content changes the key, and the corpus is read once per run, not once per rank.
    """
    comm = comm or SoloComm()
    tok_files = sorted(p for p in tokenizer_folder.iterdir() if p.is_file())
    paths = list(files) + tok_files
    blocks = hash_blocks(paths)
    lo, hi = shard_range(len(blocks), comm.rank, comm.size)
    digests = [d for part in comm.all_gather(digest_blocks(paths, blocks[lo:hi])) for d in part]
    h = hashlib.sha256(f"ltune-tokenized-v{CACHE_FORMAT_VERSION}".encode())
    for path in files:
        h.update(f"data {path.resolve()} {path.stat().st_size}\n".encode())
    for path in tok_files:
        h.update(f"tokenizer {path.name} {path.stat().st_size}\n".encode())
    for digest in digests:
        h.update(digest.encode())
    return h.hexdigest()[:24]


def cache_root() -> Path:
    return Path(os.environ.get("LTUNE_CACHE_DIR", Path.home() / ".cache" / "ltune")) / "tokenized"


def temp_name(key: str) -> str:
    """A writer's temporary folder name: unique across hosts sharing a file system (host, pid, random)."""
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:64]
    return f"{key}.tmp.{host}.{os.getpid()}.{secrets.token_hex(8)}"


def publish(tmp: Path, folder: Path) -> bool:
    """Rename the finished ``tmp`` to ``folder``; False (and ``tmp`` removed) when another writer got there first."""
    try:
        os.rename(tmp, folder)  # atomic; fails when folder exists and is not empty
        return True
    except OSError:
        if not (folder / META_FILE).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False


# ---------------------------------------------------------------- ranks working together


class Comm(Protocol):
    """The collectives the data preparation needs: this process's rank among ``size``, all-gather of a picklable object."""

    rank: int
    size: int

    def all_gather(self, obj) -> list: ...


class SoloComm:
    """One process: rank 0 of 1."""

    rank, size = 0, 1

    def all_gather(self, obj) -> list:
        return [obj]


class TorchComm:
    """A torch.distributed process group (the default one unless ``group``); its timeout bounds every wait."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def all_gather(self, obj) -> list:
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def cache_comm(root: Path, local_world_size: int, timeout=None) -> Comm:
    """The ranks that share the cache folder ``root`` and so prepare it together.

    All ranks of the job when every rank sees a file rank 0 writes there (a shared file
    system); else each node's ranks (contiguous, ``local_world_size`` per node, as torchrun
    and DeepSpeed place them), each node writing its own cache.
    """
    import torch.distributed as dist

    world = TorchComm()
    if world.size == 1:
        return world
    probe = None
    if world.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe.{temp_name('')}"
        probe.write_text("")
    name = world.all_gather(str(probe) if probe else None)[0]
    seen = world.all_gather(Path(name).exists())
    if probe:
        probe.unlink()
    if all(seen):
        return world
    group, _ = dist.new_subgroups(group_size=local_world_size, timeout=timeout)
    return TorchComm(group)


def load_or_tokenize(plan: Plan, tokenizer=None, comm: Comm | None = None) -> tuple[TokenizedData, bool]:
    """The plan's data, tokenized, memory-mapped from the cache; tokenized into it first if the inputs changed.

    Returns (data, from_cache). With ``comm`` the ranks share the work: each hashes and
    tokenizes a contiguous byte range of the corpus into its own part (in parallel, one chunk
    in memory at a time), copies it into the flat files at its offset, and rank 0 renames the
    finished temporary folder into place. A data error on any rank is raised on every rank
    (the first in file order), so that none waits for the others. A concurrent writer
    that loses the rename uses the winner's folder.
    """
    comm = comm or SoloComm()
    files = data_files(plan.training.data)
    folder = cache_root() / cache_key(files, check_tokenizer_dir(plan), comm)
    if all(comm.all_gather((folder / META_FILE).is_file())):
        return open_cache(folder), True
    tmp = folder.with_name(comm.all_gather(temp_name(folder.name) if comm.rank == 0 else None)[0])
    tmp.mkdir(parents=True, exist_ok=True)
    lo, hi = shard_range(sum(p.stat().st_size for p in files), comm.rank, comm.size)
    part = write_part(tokenizer or load_tokenizer(plan), files, lo, hi, _part_dir(tmp, comm.rank))
    parts = comm.all_gather(part)
    message = parts_error(files, parts)
    if message:
        comm.all_gather(None)  # everyone has read the outcomes before rank 0 removes the folder
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise TrainerInputError(message)
    if comm.rank == 0:
        create_arrays(tmp, parts)
    comm.all_gather(None)
    copy_part(tmp, comm.rank, parts)
    comm.all_gather(None)
    if comm.rank == 0:
        write_meta(tmp, files, parts)
        publish(tmp, folder)
    comm.all_gather(None)
    return open_cache(folder), False
