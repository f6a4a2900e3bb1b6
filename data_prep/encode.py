"""Phase 2: tokenize one unit into two flat token streams (train and valid).

Each document becomes its token ids followed by [SEP]; a document goes to the
validation split when a seeded hash of its bytes falls under ``valid_fraction``, so the
split is per document, deterministic, and a duplicated document never straddles the
two splits. A unit's streams are written through :func:`data_prep.atomic.atomic_file`;
its ``.json`` stats file appears last and marks the unit done.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import zlib
from dataclasses import dataclass

import numpy as np

from data_prep.atomic import atomic_file, write_atomic
from data_prep.sources import Unit, Utf8Counter, iter_document_batches
from data_prep.tokenizer import open_tokenizer

SPLITS = ("train", "valid")

_tokenizer = None  # this worker's data_prep.tokenizer object (one thread: workers are processes)


@dataclass(frozen=True)
class EncodeSettings:
    work_dir: str
    text_field: str
    seed: int
    valid_fraction: float
    dtype: str  # "uint16" | "uint32"
    sep_id: int


def unit_paths(work_dir: str, index: int) -> dict[str, str]:
    stem = os.path.join(work_dir, f"unit-{index:05d}")
    return {"train": f"{stem}.train.bin", "valid": f"{stem}.valid.bin", "stats": f"{stem}.json"}


def unit_done(work_dir: str, index: int) -> dict | None:
    """The stats of a finished unit, or None."""
    try:
        with open(unit_paths(work_dir, index)["stats"]) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def keep_freed_memory() -> None:
    """Let glibc keep the memory a batch frees for the next batch (no-op elsewhere).

    Every batch allocates and frees a few MB (the block read, its documents, their ids).
    By default glibc serves blocks that size with mmap and gives freed memory back to the
    system, so each batch faults its pages in anew: measured at about 5% of the encode
    phase. With these thresholds a worker reuses its heap; it peaks at a few tens of MB.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return  # not glibc
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
    mallopt(m_trim_threshold, 256 << 20)


def init_worker(data_dir: str, tokenizer: dict) -> None:
    """Open DATA_DIR's tokenizer (phase 1 wrote it; ``tokenizer``: its manifest section)."""
    global _tokenizer
    keep_freed_memory()
    # a Hugging Face tokenizer's batches run on one thread, as SentencePiece's here:
    # --workers decides how many cores encoding takes
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _tokenizer = open_tokenizer(data_dir, tokenizer)


def valid_flags(docs: list[bytes], seed: int, valid_fraction: float) -> np.ndarray:
    """Which documents belong to the validation split: bool [len(docs)].

    A document is in it when a seeded CRC-32 of its bytes falls under ``valid_fraction``.
    A content hash makes the split per document and deterministic, and puts duplicates on
    the same side; it only has to spread documents evenly, not resist an adversary, so
    CRC-32 (about 4x cheaper than a keyed BLAKE2 here) is enough.
    """
    if valid_fraction <= 0:
        return np.zeros(len(docs), bool)
    key = zlib.crc32(seed.to_bytes(8, "little", signed=True))
    hashes = np.fromiter(map(zlib.crc32, docs, itertools.repeat(key)), np.uint32, len(docs))
    return hashes < valid_fraction * 2.0**32


def with_separators(encoded: list[np.ndarray], sep_id: int, dtype: str) -> np.ndarray:
    """One flat token array: each document's ids (int32 arrays) followed by [SEP].

    ``bytes.join`` concatenates the arrays' buffers in one C call; building a numpy
    array from Python ints instead would cost about 8% of the encoding time.
    """
    sep = np.array([sep_id], np.int32).tobytes()
    # the empty last piece puts a [SEP] after the last document without another copy
    flat = np.frombuffer(sep.join([*encoded, b""]), np.int32)
    return flat.astype(dtype)


def encode_unit(unit: Unit, settings: EncodeSettings) -> dict:
    """Tokenize a unit (skipped when already done); return its stats."""
    done = unit_done(settings.work_dir, unit.index)
    if done is not None:
        return done
    paths = unit_paths(settings.work_dir, unit.index)
    docs = dict.fromkeys(SPLITS, 0)
    tokens = dict.fromkeys(SPLITS, 0)
    utf8 = Utf8Counter()
    text_bytes = 0

    def encode_batch(batch: list[bytes], files: dict) -> None:
        encoded = _tokenizer.encode_documents(batch)  # int32 arrays
        valid = valid_flags(batch, settings.seed, settings.valid_fraction)
        by_split = {"train": encoded, "valid": []}
        if valid.any():
            by_split = {
                "train": [ids for ids, v in zip(encoded, valid) if not v],
                "valid": [ids for ids, v in zip(encoded, valid) if v],
            }
        for split, part in by_split.items():
            flat = with_separators(part, settings.sep_id, settings.dtype)
            files[split].write(flat.data)
            tokens[split] += len(flat)
            docs[split] += len(part)

    # not synced, unlike the files in DATA_DIR itself: work files, deleted when the run ends
    with contextlib.ExitStack() as stack:
        files = {s: stack.enter_context(atomic_file(paths[s], sync=False)) for s in SPLITS}
        for segment in unit.segments:
            for batch in iter_document_batches(segment, settings.text_field, utf8):
                encode_batch(batch, files)
                text_bytes += sum(map(len, batch))
    stats = {
        "unit": unit.index,
        "bytes": unit.nbytes,
        "text_bytes": text_bytes,
        "invalid_utf8": utf8.replaced,
        "docs": docs,
        "tokens": tokens,
    }
    write_atomic(paths["stats"], json.dumps(stats).encode(), sync=False)
    return stats
