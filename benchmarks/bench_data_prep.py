"""data_prep throughput against raw SentencePiece encoding, and memory against corpus size.

    python benchmarks/bench_data_prep.py [--mb 30] [--doc-kb K] [--corpus PATH ...]
        [--workers N] [--repeat 3] [--skip-memory] [--json OUT]

Side by side in one run, on the same corpus, tokenizer and number of worker processes,
in interleaved rounds (medians and per-round ratios reported):

- raw program: ``benchmarks/raw_encode.py``, the smallest complete program that
  tokenizes the corpus file with SentencePiece on ``workers`` processes and writes
  nothing, timed as a subprocess (wall time). The goal's baseline: data_prep's
  throughput over this program's, both run as a user runs them, should be at least 0.8;
- raw encode: ``workers`` processes that hold the corpus' documents in their own memory
  and do nothing but ``SentencePieceProcessor.encode`` on batches of them, timed from a
  barrier to the last batch (see ``raw_encode``): the encoding alone, without the
  interpreter's start, the imports or the reading, which no command can leave out (at
  tens of MB, the raw program takes 15-30% longer than this);
- pipeline: ``python -m data_prep --tokenizer MODEL`` end to end (reading, splitting,
  encoding, packing, Arrow shards, hashes, manifest), timed as a subprocess (wall time)
  and by its own clock (the manifest's ``stats``);
- memory: the pipeline's peak resident memory (all its processes together, sampled every
  50 ms, in runs of their own) on the corpus and on a corpus ten times larger.

The corpus is the built-in ``python-docstrings`` corpus, its documents shuffled and
repeated (seeded) up to the requested size (``--doc-kb`` joins them into larger
documents), or your own (``--corpus``, read as data_prep reads it and written once as a
.txt file that all contenders read). Tokenizer training is timed separately; it is not
part of either throughput. The contenders must count the same tokens, or the run stops.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# as ``python -m data_prep`` does for itself: OpenBLAS's idle threads, started when numpy
# is imported, would take CPU time from the raw encoding workers (measured: up to 10%)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, REPO)

from data_prep.builtin_corpus import write_builtin  # noqa: E402


def builtin_documents(tmp: str) -> list[str]:
    """The documents of the built-in ``python-docstrings`` corpus."""
    base = os.path.join(tmp, "builtin.txt")
    write_builtin("python-docstrings", base)
    with open(base, encoding="utf-8") as f:
        return [d for d in f.read().split("\n\n") if d.strip()]


def user_documents(inputs: list[str], text_field: str) -> list[str]:
    """The documents of a user's corpus (any ``--input`` of data_prep) as data_prep reads
    them, cut further at any blank line inside them (a JSONL text may hold some), so that
    written one after another with a blank line between them, every contender reads the
    same documents back."""
    from data_prep.sources import Utf8Counter, iter_documents, plan_units, resolve_inputs

    docs = []
    for unit in plan_units(resolve_inputs(inputs), 64 << 20):
        for segment in unit.segments:
            for doc in iter_documents(segment, text_field, Utf8Counter()):
                text = doc.decode("utf-8")
                docs += [d.strip() for d in _BLANK_LINE.split(text) if d.strip()]
    if not docs:
        raise SystemExit(f"no documents in {' '.join(inputs)}")
    return docs


_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")  # data_prep's document separator in .txt


def make_corpus(
    path: str, docs: list[str], mb: float | None, seed: int, doc_kb: float = 0
) -> list[str]:
    """Write a corpus of about ``mb`` MB to ``path`` from ``docs``; return its documents.

    The documents are shuffled (seeded) and repeated up to the size; with ``mb`` None,
    written once as they are. The built-in corpus' docstrings average under 300 bytes,
    far below the documents of real pretraining corpora (Wikipedia and C4 average a few
    KB), which makes per-document costs weigh more than usual; with ``doc_kb``,
    consecutive documents are joined into documents of about that size.
    """
    if mb is None:
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n\n".join(docs) + "\n")
        return list(docs)
    docs = list(docs)
    rng = random.Random(seed)
    out, size, current = [], 0, []
    while size < mb * 1e6:
        rng.shuffle(docs)
        for d in docs:
            current.append(d)
            if sum(map(len, current)) < doc_kb * 1e3:
                continue
            out.append("\n".join(current))
            current = []
            size += len(out[-1].encode()) + 2
            if size >= mb * 1e6:
                break
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(out) + "\n")
    return out


_RAW_BATCH = 1024  # documents per SentencePiece call


def _raw_worker(model: str, docs_file: str, barrier, next_batch, ends) -> None:
    """Encode batches of the documents pickled in ``docs_file``, taking the next batch
    number from the shared counter ``next_batch`` until none is left; report (tokens,
    end time). Everything before the barrier is untimed."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    with open(docs_file, "rb") as f:
        docs = pickle.load(f)
    sp.encode([b"warm up"], out_type="numpy", num_threads=1)
    barrier.wait()
    tokens = 0
    while True:
        with next_batch.get_lock():
            start = next_batch.value * _RAW_BATCH
            next_batch.value += 1
        if start >= len(docs):
            break
        # SentencePiece's fastest public call: UTF-8 bytes in, int32 numpy arrays out
        batch = sp.encode(docs[start : start + _RAW_BATCH], out_type="numpy", num_threads=1)
        tokens += sum(map(len, batch))
    ends.put((tokens, time.perf_counter()))


def raw_encode(docs: list[str], model: str, workers: int, tmp: str) -> tuple[float, int]:
    """Seconds for ``workers`` processes to encode ``docs``. Each holds all the documents
    in its own memory before the clock starts, and they share the work a batch at a time
    (as data_prep's workers share units), so that a worker slowed down by the machine
    does not hold the others back. Nothing is read, sent or shared but a batch counter
    while they run: inherited through fork, the documents would be copied page by page as
    the workers touch them (at 1 GB that made raw encoding slower than data_prep itself),
    and split out of a freshly read file they lie scattered in the heap (measured ~10%
    slower at 100 MB); either would flatter data_prep. Returns (seconds, tokens)."""
    docs_file = os.path.join(tmp, "raw-docs.pickle")
    with open(docs_file, "wb") as f:
        pickle.dump([d.encode() for d in docs], f)
    ctx = multiprocessing.get_context("spawn")
    barrier, next_batch, ends = ctx.Barrier(workers + 1), ctx.Value("q", 0), ctx.Queue()
    procs = [
        ctx.Process(target=_raw_worker, args=(model, docs_file, barrier, next_batch, ends))
        for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    barrier.wait(timeout=600)  # a worker that died before it raises BrokenBarrierError
    t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    results = [ends.get(timeout=3600) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise SystemExit(f"raw encoding worker failed with exit code {proc.exitcode}")
    os.remove(docs_file)
    return max(end for _, end in results) - t0, sum(tokens for tokens, _ in results)


def raw_program(corpus: str, model: str, workers: int) -> tuple[float, int]:
    """Wall time of ``benchmarks/raw_encode.py`` on the corpus, and its token count."""
    script = os.path.join(REPO, "benchmarks", "raw_encode.py")
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, script, corpus, model, str(workers)],
        capture_output=True,
        check=True,
        text=True,
    )
    return time.perf_counter() - t0, int(done.stdout)


def run_pipeline(cmd: list[str]) -> float:
    """Wall time of a command; nothing else runs in this process meanwhile."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"data_prep failed:\n{done.stderr.decode()}")
    return elapsed


def peak_memory(cmd: list[str]) -> tuple[float, int]:
    """Wall time and peak total RSS (bytes) of a command and its children. The sampling
    takes CPU time from the command (measured: ~3% at 30 MB), so these runs are not the
    timed rounds."""
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
    p.add_argument(
        "--corpus",
        nargs="+",
        metavar="PATH",
        help="your own corpus instead of the built-in one: files, directories or globs as "
        "data_prep's --input takes them, used as they are (--mb and --doc-kb are ignored)",
    )
    p.add_argument("--text-field", default="text", help="with --corpus: JSONL/Parquet field")
    p.add_argument("--mb", type=float, default=30.0, help="corpus size for throughput")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds (medians)")
    p.add_argument(
        "--doc-kb",
        type=float,
        default=0,
        help="join docstrings into documents of about this size (0: docstrings as they are)",
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument("--skip-memory", action="store_true", help="skip the 10x memory run")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_data_prep_") as tmp:
        small = os.path.join(tmp, "small.txt")
        if args.corpus:
            base_docs = user_documents(args.corpus, args.text_field)
            docs = make_corpus(small, base_docs, None, seed=0)
        else:
            base_docs = builtin_documents(tmp)
            docs = make_corpus(small, base_docs, args.mb, seed=0, doc_kb=args.doc_kb)
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

        # Interleaved rounds, so that machine noise hits both contenders alike; medians.
        raw_runs, prog_runs, pipe_runs, pipe_inner, pipe_encode = [], [], [], [], []
        for r in range(args.repeat):
            raw_s, raw_tokens = raw_encode(docs, model, args.workers, tmp)
            raw_runs.append(raw_s)
            prog_s, prog_tokens = raw_program(small, model, args.workers)
            prog_runs.append(prog_s)
            if prog_tokens != raw_tokens:
                raise SystemExit(
                    f"the raw program encoded {prog_tokens} tokens, the raw encoders "
                    f"{raw_tokens}: they did not read the same documents"
                )
            out = os.path.join(tmp, f"pipe-{r}")
            pipe_s = run_pipeline([*base, "--input", small, "--output", out, "--tokenizer", model])
            pipe_runs.append(pipe_s)
            with open(os.path.join(out, "manifest.json")) as f:
                manifest = json.load(f)
            pipe_inner.append(manifest["stats"]["seconds"])
            pipe_encode.append(manifest["stats"]["encode_seconds"])
            shutil.rmtree(out)
        raw_s, prog_s, pipe_s, inner_s = map(
            statistics.median, (raw_runs, prog_runs, pipe_runs, pipe_inner)
        )
        _, pipe_peak = peak_memory(
            [*base, "--input", small, "--output", os.path.join(tmp, "memory"), "--tokenizer", model]
        )
        # stream tokens without the [CLS] per row, the padding and the [SEP] per document
        pipe_tokens = sum(s["tokens"] - s["rows"] - s["docs"] for s in manifest["splits"].values())
        if pipe_tokens != raw_tokens:
            raise SystemExit(
                f"data_prep encoded {pipe_tokens} tokens, the raw encoders {raw_tokens}: "
                "they did not read the same documents"
            )

        result = {
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "python": platform.python_version(),
            },
            "workers": args.workers,
            "corpus_bytes": size,
            "documents": len(docs),
            "mean_document_bytes": round(size / len(docs)),
            "rounds": args.repeat,
            "first_run_with_tokenizer_training_s": round(first_run, 2),
            # the goal: data_prep's throughput over the raw program's, both end to end
            "pipeline_over_raw_program": round(prog_s / pipe_s, 3),
            "pipeline_over_raw_program_per_round": [
                round(r / p, 3) for r, p in zip(prog_runs, pipe_runs)
            ],
            "raw_program_s": round(prog_s, 3),
            "raw_program_s_all": [round(x, 3) for x in prog_runs],
            "raw_program_MBps": round(size / 1e6 / prog_s, 3),
            "raw_encode_s": round(raw_s, 3),
            "raw_encode_s_all": [round(x, 3) for x in raw_runs],
            "raw_MBps": round(size / 1e6 / raw_s, 3),
            "raw_tokens": raw_tokens,
            "pipeline_s": round(pipe_s, 3),
            "pipeline_s_all": [round(x, 3) for x in pipe_runs],
            "pipeline_MBps": round(size / 1e6 / pipe_s, 3),
            "pipeline_tokens": pipe_tokens,
            # against the encoding alone (no start, imports or reading): see the docstring
            "pipeline_over_raw_encode": round(raw_s / pipe_s, 3),
            "pipeline_over_raw_encode_per_round": [
                round(r / p, 3) for r, p in zip(raw_runs, pipe_runs)
            ],
            "raw_program_over_raw_encode": round(raw_s / prog_s, 3),
            # data_prep's own clock: from its argument check to the manifest written, i.e.
            # without the interpreter's start and the imports (~0.1 s)
            "pipeline_in_process_s": inner_s,
            "pipeline_in_process_over_raw_encode": round(raw_s / inner_s, 3),
            # of which the encode phase: worker start-up to the last unit, packing alongside
            "pipeline_encode_phase_s": statistics.median(pipe_encode),
            "pipeline_in_process_over_raw_encode_per_round": [
                round(r / p, 3) for r, p in zip(raw_runs, pipe_inner)
            ],
            "peak_rss_MB": round(pipe_peak / 1e6, 1),
        }
        if not args.skip_memory:
            large = os.path.join(tmp, "large.txt")
            make_corpus(large, docs, size / 1e6 * 10, seed=1)
            large_s, large_peak = peak_memory(
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
