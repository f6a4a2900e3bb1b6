"""Phase 1: tokenize one unit into two flat token streams (train and valid).

Each document becomes its token ids followed by [SEP]; a document goes to the
validation split when a keyed hash of its text falls under ``valid_fraction``, so the
split is per document, deterministic, and a duplicated document never straddles the
two splits. A unit's streams are written under temporary names and renamed when
complete; its ``.json`` stats file is renamed last and marks the unit done.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass

import numpy as np

from data_prep.sources import Unit, Utf8Counter, iter_documents

SPLITS = ("train", "valid")
_BATCH_CHARS = 1 << 20  # documents encoded per SentencePiece call, by size

_sp = None  # this worker's SentencePieceProcessor (one thread: workers are processes)


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


def init_worker(model_bytes: bytes) -> None:
    global _sp
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor(model_proto=model_bytes)


def valid_flags(texts: list[str], seed: int, valid_fraction: float) -> np.ndarray:
    """Which documents belong to the validation split: a keyed hash of each text under
    ``valid_fraction``. bool [len(texts)]."""
    if valid_fraction <= 0:
        return np.zeros(len(texts), bool)
    key, limit = seed.to_bytes(8, "little"), valid_fraction * 2.0**64
    return np.fromiter(
        (
            int.from_bytes(_blake2b(t.encode("utf-8", "surrogatepass"), key).digest(), "little")
            < limit
            for t in texts
        ),
        bool,
        len(texts),
    )


def _blake2b(data: bytes, key: bytes):
    return hashlib.blake2b(data, digest_size=8, key=key)


def with_separators(
    encoded: list[list[int]], sep_id: int, dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """Flatten encoded documents, each followed by [SEP]. Returns (tokens, lengths), where
    lengths counts each document's [SEP]."""
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded)) + 1
    tokens = np.full(int(lengths.sum()), sep_id, dtype)
    is_text = np.ones(len(tokens), bool)
    is_text[np.cumsum(lengths) - 1] = False
    tokens[is_text] = np.fromiter(
        itertools.chain.from_iterable(encoded), dtype, len(tokens) - len(encoded)
    )
    return tokens, lengths


def encode_unit(unit: Unit, settings: EncodeSettings) -> dict:
    """Tokenize a unit (skipped when already done); return its stats."""
    done = unit_done(settings.work_dir, unit.index)
    if done is not None:
        return done
    paths = unit_paths(settings.work_dir, unit.index)
    tmp = {s: f"{paths[s]}.tmp-{os.getpid()}" for s in SPLITS}
    files = {s: open(tmp[s], "wb") for s in SPLITS}  # closed below
    docs = dict.fromkeys(SPLITS, 0)
    tokens = dict.fromkeys(SPLITS, 0)
    utf8 = Utf8Counter()
    chars = 0
    batch: list[str] = []

    def encode_batch() -> None:
        flat, lengths = with_separators(
            _sp.encode(batch, out_type=int, num_threads=1), settings.sep_id, settings.dtype
        )
        valid = valid_flags(batch, settings.seed, settings.valid_fraction)
        in_valid = np.repeat(valid, lengths)
        for split, mask in (("train", ~in_valid), ("valid", in_valid)):
            part = flat[mask]
            files[split].write(part.tobytes())
            tokens[split] += len(part)
            docs[split] += int(np.count_nonzero(~valid if split == "train" else valid))
        batch.clear()

    try:
        batch_chars = 0
        for segment in unit.segments:
            for doc in iter_documents(segment, settings.text_field, utf8):
                batch.append(doc)
                batch_chars += len(doc)
                chars += len(doc)
                if batch_chars >= _BATCH_CHARS:
                    encode_batch()
                    batch_chars = 0
        if batch:
            encode_batch()
        for split in SPLITS:
            files[split].close()
            os.replace(tmp[split], paths[split])
    except BaseException:
        for split in SPLITS:
            files[split].close()
            if os.path.exists(tmp[split]):
                os.remove(tmp[split])
        raise
    stats = {
        "unit": unit.index,
        "bytes": unit.nbytes,
        "chars": chars,
        "invalid_utf8": utf8.replaced,
        "docs": docs,
        "tokens": tokens,
    }
    tmp = f"{paths['stats']}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(stats, f)
    os.replace(tmp, paths["stats"])
    return stats
