"""data_prep throughput against raw SentencePiece encoding, and memory against corpus size.

    python benchmarks/bench_data_prep.py [--mb 30] [--workers 2] [--json OUT]

Side by side in one run, on the same corpus, tokenizer and number of worker processes:

- raw: the corpus' documents already in memory, split across ``workers`` processes that
  do nothing but ``SentencePieceProcessor.encode`` (the ceiling for data_prep);
- pipeline: ``python -m data_prep --tokenizer MODEL`` end to end (reading, splitting,
  encoding, packing, Arrow shards, hashes, manifest), timed as a subprocess;
- memory: the pipeline's peak resident memory (all its processes together, sampled every
  50 ms) on the corpus and on a corpus ten times larger.

The corpus is the built-in ``python-docstrings`` corpus, its documents shuffled and
repeated (seeded) up to the requested size. Tokenizer training is timed separately; it
is not part of either throughput.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data_prep.builtin_corpus import write_builtin  # noqa: E402


def make_corpus(path: str, mb: float, seed: int) -> list[str]:
    base = os.path.join(os.path.dirname(path), "builtin.txt")
    if not os.path.exists(base):
        write_builtin("python-docstrings", base)
    with open(base, encoding="utf-8") as f:
        docs = [d for d in f.read().split("\n\n") if d.strip()]
    rng = random.Random(seed)
    out, size = [], 0
    while size < mb * 1e6:
        rng.shuffle(docs)
        for d in docs:
            out.append(d)
            size += len(d.encode()) + 2
            if size >= mb * 1e6:
                break
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(out) + "\n")
    return out


_sp = None


def _init(model: str) -> None:
    global _sp
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor(model_file=model)


def _encode(docs: list[str]) -> int:
    tokens = 0
    for i in range(0, len(docs), 256):
        tokens += sum(
            len(ids) for ids in _sp.encode(docs[i : i + 256], out_type=int, num_threads=1)
        )
    return tokens


def raw_encode(docs: list[str], model: str, workers: int) -> tuple[float, int]:
    chunks = [docs[i::workers] for i in range(workers)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_init, initargs=(model,)) as pool:
        pool.map(_encode, [["warm up"]] * workers)
        t0 = time.perf_counter()
        tokens = sum(pool.map(_encode, chunks))
        return time.perf_counter() - t0, tokens


def run_pipeline(cmd: list[str]) -> tuple[float, int]:
    """Wall time and peak total RSS (bytes) of a command and its children."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        parent = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    elapsed = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"data_prep failed:\n{err.decode()}")
    return elapsed, peak


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mb", type=float, default=30.0, help="corpus size for throughput")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--skip-memory", action="store_true", help="skip the 10x memory run")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_data_prep_") as tmp:
        small = os.path.join(tmp, "small.txt")
        docs = make_corpus(small, args.mb, seed=0)
        size = os.path.getsize(small)

        # a tokenizer for both contenders (training is timed on its own)
        tok_dir = os.path.join(tmp, "tok")
        t0 = time.perf_counter()
        base = [
            sys.executable,
            "-m",
            "data_prep",
            "--seq-len",
            str(args.seq_len),
            "--workers",
            str(args.workers),
        ]
        subprocess.run(
            [
                *base,
                "--input",
                small,
                "--output",
                tok_dir,
                "--vocab-size",
                str(args.vocab_size),
                "--tokenizer-sample-mb",
                "10",
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        first_run = time.perf_counter() - t0
        model = os.path.join(tok_dir, "tokenizer.model")

        raw_s, raw_tokens = raw_encode(docs, model, args.workers)
        pipe_s, pipe_peak = run_pipeline(
            [*base, "--input", small, "--output", os.path.join(tmp, "pipe"), "--tokenizer", model]
        )
        with open(os.path.join(tmp, "pipe", "manifest.json")) as f:
            splits = json.load(f)["splits"]
        # stream tokens, without the [CLS] per row and padding, to compare with raw counts
        pipe_tokens = sum(s["tokens"] - s["rows"] for s in splits.values())

        result = {
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "python": platform.python_version(),
            },
            "workers": args.workers,
            "corpus_bytes": size,
            "first_run_with_tokenizer_training_s": round(first_run, 2),
            "raw_encode_s": round(raw_s, 2),
            "raw_MBps": round(size / 1e6 / raw_s, 3),
            "raw_tokens": raw_tokens,
            "pipeline_s": round(pipe_s, 2),
            "pipeline_MBps": round(size / 1e6 / pipe_s, 3),
            "pipeline_tokens": pipe_tokens,
            "pipeline_over_raw_throughput": round(raw_s / pipe_s, 3),
            "peak_rss_MB": round(pipe_peak / 1e6, 1),
        }
        if not args.skip_memory:
            large = os.path.join(tmp, "large.txt")
            make_corpus(large, args.mb * 10, seed=1)
            large_s, large_peak = run_pipeline(
                [
                    *base,
                    "--input",
                    large,
                    "--output",
                    os.path.join(tmp, "large"),
                    "--tokenizer",
                    model,
                ]
            )
            result.update(
                {
                    "large_corpus_bytes": os.path.getsize(large),
                    "large_pipeline_s": round(large_s, 2),
                    "large_peak_rss_MB": round(large_peak / 1e6, 1),
                    "peak_rss_ratio_10x": round(large_peak / pipe_peak, 3),
                }
            )

    for key, value in result.items():
        print(f"{key:>36}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
