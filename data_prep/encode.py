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
_FLUSH_TOKENS = 1 << 20

_sp = None  # this worker's SentencePieceProcessor


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


def in_valid_split(text: str, seed: int, valid_fraction: float) -> bool:
    """Whether a document belongs to the validation split (keyed hash of its text)."""
    if valid_fraction <= 0:
        return False
    digest = hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), digest_size=8, key=seed.to_bytes(8, "little")
    ).digest()
    return int.from_bytes(digest, "little") < valid_fraction * 2.0**64


class _Stream:
    """A split's token stream of one unit, flushed to a temporary file as it grows."""

    def __init__(self, path: str, dtype: str) -> None:
        self.final, self.tmp = path, f"{path}.tmp-{os.getpid()}"
        self.file = open(self.tmp, "wb")  # closed in close() or discard()
        self.dtype = np.dtype(dtype)
        self.pending: list[list[int]] = []
        self.pending_tokens = 0
        self.docs = self.tokens = 0

    def add(self, ids: list[int], sep_id: int) -> None:
        ids.append(sep_id)
        self.pending.append(ids)
        self.pending_tokens += len(ids)
        self.docs += 1
        if self.pending_tokens >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            flat = np.fromiter(
                itertools.chain.from_iterable(self.pending), self.dtype, self.pending_tokens
            )
            self.file.write(flat.tobytes())
            self.tokens += self.pending_tokens
            self.pending, self.pending_tokens = [], 0

    def close(self) -> None:
        self.flush()
        self.file.close()
        os.replace(self.tmp, self.final)

    def discard(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def encode_unit(unit: Unit, settings: EncodeSettings) -> dict:
    """Tokenize a unit (skipped when already done); return its stats."""
    done = unit_done(settings.work_dir, unit.index)
    if done is not None:
        return done
    paths = unit_paths(settings.work_dir, unit.index)
    streams = {s: _Stream(paths[s], settings.dtype) for s in SPLITS}
    utf8 = Utf8Counter()
    chars = 0
    batch: list[str] = []
    batch_chars = 0

    def encode_batch() -> None:
        for text, ids in zip(batch, _sp.encode(batch, out_type=int)):
            split = (
                "valid" if in_valid_split(text, settings.seed, settings.valid_fraction) else "train"
            )
            streams[split].add(ids, settings.sep_id)
        batch.clear()

    try:
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
        for stream in streams.values():
            stream.close()
    except BaseException:
        for stream in streams.values():
            stream.discard()
        raise
    stats = {
        "unit": unit.index,
        "bytes": unit.nbytes,
        "chars": chars,
        "invalid_utf8": utf8.replaced,
        "docs": {s: streams[s].docs for s in SPLITS},
        "tokens": {s: streams[s].tokens for s in SPLITS},
    }
    tmp = f"{paths['stats']}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(stats, f)
    os.replace(tmp, paths["stats"])
    return stats
