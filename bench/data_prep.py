"""Data preparation at corpus scale: today's path versus the streamed, memory-mapped cache.

    python bench/data_prep.py                       # 100M tokens new, 10M tokens legacy
    python bench/data_prep.py --tokens 2e6 --legacy-tokens 2e6   # quick

Generates a corpus in a temporary folder (the example stories' sentences recombined, with
the example chat records mixed in), then runs each path in its own subprocess and reports
tokens/s of preparation (parse, tokenize, write the cache) and peak RSS per token, where
tokens are counted as the example tokenizer makes them. Peak RSS per token is the growth
of the peak resident set over the process's size once the tokenizer is loaded, divided by
the tokens prepared.

``_legacy_tokenize`` is the earlier in-memory implementation (Python lists of every token, then
np.save of the whole arrays), kept here only as the baseline. By default it runs on a
10M-token prefix of the corpus (the first files): at ~54 bytes/token the full 100M would
need ~5 GB and several minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-cpu"
TOKENIZER = EXAMPLE / "tokenizer"
#: tokens per byte of the generated JSONL (measured on the example data; only sizes the files)
TOKENS_PER_BYTE = 0.22
FILES = 8


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ---------------------------------------------------------------- corpus


def generate(folder: Path, tokens: float, seed: int = 0) -> list[Path]:
    """FILES JSONL files of about ``tokens`` tokens: stories of 3-9 sentences drawn from the example
    stories' sentences, and every 10th record one of the example chat records."""
    sentences = []
    for line in (EXAMPLE / "data" / "stories.jsonl").read_text().splitlines():
        sentences += [s.strip() + "." for s in json.loads(line)["text"].split(".") if s.strip()]
    chats = (EXAMPLE / "data" / "chat.jsonl").read_text().splitlines()
    rng = random.Random(seed)
    per_file = int(tokens / TOKENS_PER_BYTE / FILES) + 1
    paths = []
    for i in range(FILES):
        path = folder / f"part{i:02d}.jsonl"
        written, lines = 0, []
        with path.open("w") as f:
            while written < per_file:
                if rng.random() < 0.1:
                    line = rng.choice(chats) + "\n"
                else:
                    line = json.dumps({"text": " ".join(rng.choices(sentences, k=rng.randint(3, 9)))}) + "\n"
                lines.append(line)
                written += len(line)
                if len(lines) == 4096:
                    f.write("".join(lines))
                    lines = []
            f.write("".join(lines))
        paths.append(path)
    return paths


# ---------------------------------------------------------------- the two paths (each in a subprocess)


def _legacy_tokenize(tokenizer, files: list[Path], out: Path) -> int:
    """The earlier implementation: every token in Python lists, converted to arrays, saved whole (np.save)."""
    import numpy as np

    from ltune.job.data_files import iter_records
    from ltune.trainer.data import tokenize_record

    tokens: list[int] = []
    mask: list[bool] = []
    offsets = [0]
    for path in files:
        for kind, where, record in iter_records(path):
            ids, m = tokenize_record(tokenizer, kind, record, where)
            tokens.extend(ids)
            mask.extend(m)
            offsets.append(len(tokens))
    arrays = (np.asarray(tokens, dtype=np.int32), np.asarray(mask, dtype=bool), np.asarray(offsets, dtype=np.int64))
    out.mkdir(parents=True, exist_ok=True)
    for name, array in zip(("tokens", "loss_mask", "doc_offsets"), arrays):
        np.save(out / f"{name}.npy", array)
    return len(arrays[0])


def _new_tokenize(tokenizer, files: list[Path], out: Path) -> int:
    """The cache writer of ltune.trainer.data (one process: rank 0 of 1), key and all."""
    from ltune.trainer import data

    os.environ["LTUNE_CACHE_DIR"] = str(out)
    prepared, cached = data.load_or_tokenize(_plan(files), tokenizer)
    assert not cached
    return len(prepared.tokens)


def _plan(files: list[Path]):
    sys.path.insert(0, str(REPO / "tests"))
    from _launch import tiny_plan_dict

    from ltune.planner.schema import Plan

    return Plan.model_validate(tiny_plan_dict(training={"data": [str(f) for f in files]}))


def worker(kind: str, files: list[Path], out: Path) -> dict:
    """One path in this fresh process: both import the same modules and load the tokenizer before the base RSS."""
    from transformers import AutoTokenizer

    from ltune.trainer import data  # noqa: F401

    _plan(files[:1])
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    tokenizer(["warm up"], add_special_tokens=False)
    base = _rss_bytes()
    start, cpu = time.perf_counter(), time.process_time()
    count = (_legacy_tokenize if kind == "legacy" else _new_tokenize)(tokenizer, files, out)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    peak = _peak_rss_bytes()
    return {"kind": kind, "tokens": count, "seconds": seconds, "cpu_seconds": cpu_seconds, "base_rss_bytes": base,
            "peak_rss_bytes": peak, "peak_rss_bytes_per_token": (peak - base) / count}


def run(kind: str, files: list[Path], folder: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=folder))
    cmd = [sys.executable, __file__, "--worker", kind, "--out", str(out), *map(str, files)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _line(r: dict) -> str:
    return (f"{r['kind']:>6}: {r['tokens'] / 1e6:8.2f}M tokens in {r['seconds']:7.1f} s = {r['tokens'] / r['seconds'] / 1e3:7.1f}k tokens/s"
            f" ({r['tokens'] / r['cpu_seconds'] / 1e3:.1f}k per CPU second);"
            f" peak RSS {r['peak_rss_bytes'] / 2**20:7.0f} MiB (base {r['base_rss_bytes'] / 2**20:.0f} MiB),"
            f" {r['peak_rss_bytes_per_token']:.3f} bytes/token over base")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=100e6, help="tokens of the generated corpus (new path)")
    parser.add_argument("--legacy-tokens", type=float, default=10e6, help="tokens of the prefix the legacy path runs on")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each path on the prefix (the fastest is kept)")
    parser.add_argument("--worker", choices=["legacy", "new"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.files, args.out)))
        return
    with tempfile.TemporaryDirectory(prefix="ltune-bench-data-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        files = generate(folder, args.tokens)
        size = sum(f.stat().st_size for f in files)
        print(f"corpus: {len(files)} files, {size / 2**20:.0f} MiB, generated in {time.perf_counter() - start:.0f} s", flush=True)
        prefix = files[: max(1, round(FILES * args.legacy_tokens / args.tokens))]
        # the machine may be shared: each path twice, alternating, the faster run of each kept
        legacy = new_prefix = None
        for _ in range(args.repeats):
            got = run("legacy", prefix, folder)
            print(_line(got), flush=True)
            legacy = got if legacy is None or got["seconds"] < legacy["seconds"] else legacy
            got = run("new", prefix, folder)
            print(_line(got) + "  (same prefix)", flush=True)
            new_prefix = got if new_prefix is None or got["seconds"] < new_prefix["seconds"] else new_prefix
        if prefix != files:
            new = run("new", files, folder)
            print(_line(new) + "  (whole corpus)", flush=True)
        else:
            new = new_prefix
        print(f"same prefix, same token count: {new_prefix['tokens'] == legacy['tokens']}")
        speed = (new_prefix["tokens"] / new_prefix["seconds"]) / (legacy["tokens"] / legacy["seconds"])
        same = legacy["peak_rss_bytes_per_token"] / max(new_prefix["peak_rss_bytes_per_token"], 1e-9)
        print(f"legacy / new peak RSS bytes per token (same prefix): {same:.0f}x")
        memory = legacy["peak_rss_bytes_per_token"] / max(new["peak_rss_bytes_per_token"], 1e-9)
        cpu = (new_prefix["tokens"] / new_prefix["cpu_seconds"]) / (legacy["tokens"] / legacy["cpu_seconds"])
        print(f"new / legacy tokens/s (same prefix, fastest runs): {speed:.2f}x wall, {cpu:.2f}x per CPU second")
        print(f"legacy / new peak RSS bytes per token (legacy on {legacy['tokens'] / 1e6:.0f}M, new on {new['tokens'] / 1e6:.0f}M;"
              f" legacy grows linearly, new is a constant): {memory:.0f}x")


if __name__ == "__main__":
    main()
