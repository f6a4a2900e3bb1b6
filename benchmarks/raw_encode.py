"""The raw contender of bench_data_prep.py: a text corpus tokenized, nothing else.

    python benchmarks/raw_encode.py CORPUS.txt MODEL WORKERS

The smallest complete program that tokenizes a file of documents separated by blank
lines with SentencePiece on WORKERS processes: it imports nothing but SentencePiece and
multiprocessing, and each worker reads its own byte ranges of the file, cuts them into
documents with ``bytes.split`` and encodes them a batch at a time. It writes nothing,
hashes nothing and splits nothing off for validation; it prints the number of tokens.
"""

import multiprocessing
import os
import sys

_BLOCK = 4 << 20  # bytes read at a time
_BATCH = 1024  # documents per SentencePiece call


_sp = None


def _init(model: str) -> None:
    global _sp
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor(model_file=model)


def _boundary(f, pos: int, size: int) -> int:
    """Where the first document starting at or after ``pos`` starts: just past the next
    ``\\n\\n``. Neighbouring ranges agree on it, so every document is read once."""
    if pos <= 0 or pos >= size:
        return min(max(pos, 0), size)
    f.seek(pos)
    tail = b""
    while chunk := f.read(1 << 16):
        found = (tail + chunk).find(b"\n\n")
        if found >= 0:
            return pos - len(tail) + found + 2
        pos += len(chunk)
        tail = chunk[-1:]
    return size


def _encode_range(job: tuple[str, int, int]) -> int:
    path, lo, hi = job
    tokens = 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        start, end = _boundary(f, lo, size), _boundary(f, hi, size)
        f.seek(start)
        carry = b""
        while start < end:
            block = f.read(min(_BLOCK, end - start))
            start += len(block)
            docs = (carry + block).split(b"\n\n")
            carry = docs.pop() if start < end else b""
            docs = [d for d in docs if d.strip()]
            for i in range(0, len(docs), _BATCH):
                batch = _sp.encode(docs[i : i + _BATCH], out_type="numpy", num_threads=1)
                tokens += sum(map(len, batch))
    return tokens


def main() -> None:
    path, model, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    size = os.path.getsize(path)
    # small ranges (about 32 per worker, 256 KiB to 64 MiB), shared out as the workers
    # ask: they finish together, whatever the machine does to one of them
    step = int(min(64 << 20, max(1 << 18, size // (workers * 32))))
    jobs = [(path, lo, min(lo + step, size)) for lo in range(0, size, step)]
    with multiprocessing.get_context("fork").Pool(workers, _init, (model,)) as pool:
        print(sum(pool.imap_unordered(_encode_range, jobs)))


if __name__ == "__main__":
    main()
