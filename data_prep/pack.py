"""Phase 2: pack a split's token stream into fixed-length sequences and Arrow shards.

The stream is every unit's stream concatenated in corpus order (documents already end
in [SEP]). Each sequence is [CLS] followed by the next ``seq_len - 1`` stream tokens,
so long documents continue in the next sequence; only the split's last sequence is
padded. Shards hold ``shard_rows`` sequences in the Arrow IPC file format. A shard
that already exists under its final name is left as it is (a rerun's skip), which is
safe because the bytes are a pure function of the inputs and settings.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


def shard_schema(seq_len: int, dtype: str) -> pa.Schema:
    return pa.schema(
        [pa.field("input_ids", pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), seq_len))]
    )


def _arrow(array: np.ndarray) -> pa.Array:
    """A 1-D numpy array as an Arrow array without a copy; unlike ``pa.array`` this does
    not import pandas (0.3 s of start-up)."""
    array = np.ascontiguousarray(array)
    return pa.Array.from_buffers(
        pa.from_numpy_dtype(array.dtype), len(array), [None, pa.py_buffer(array)]
    )


class Packer:
    """Turns a token stream, fed in pieces, into rows of [CLS] + (seq_len - 1) tokens."""

    def __init__(self, seq_len: int, dtype: str, cls_id: int, pad_id: int) -> None:
        self.body = seq_len - 1
        self.seq_len, self.dtype, self.cls_id, self.pad_id = (
            seq_len,
            np.dtype(dtype),
            cls_id,
            pad_id,
        )
        self.carry = np.empty(0, self.dtype)

    def _rows(self, body: np.ndarray) -> np.ndarray:
        rows = np.empty((len(body), self.seq_len), self.dtype)  # [rows, seq_len]
        rows[:, 0] = self.cls_id
        rows[:, 1:] = body
        return rows

    def feed(self, tokens: np.ndarray) -> np.ndarray:
        stream = np.concatenate([self.carry, tokens]) if len(self.carry) else tokens
        full = len(stream) // self.body
        self.carry = stream[full * self.body :].copy()
        return self._rows(stream[: full * self.body].reshape(full, self.body))

    def finish(self) -> np.ndarray:
        if not len(self.carry):
            return self._rows(np.empty((0, self.body), self.dtype))
        body = np.full((1, self.body), self.pad_id, self.dtype)
        body[0, : len(self.carry)] = self.carry
        self.carry = self.carry[:0]
        return self._rows(body)


@dataclass
class ShardRecord:
    file: str  # relative to the data directory
    rows: int
    tokens: int  # non-padding tokens
    sha256: str


def serialize_shard(rows: np.ndarray, seq_len: int) -> bytes:
    """The Arrow IPC file bytes of a shard: one ``input_ids`` fixed-size-list column, in
    one record batch, so a reader maps the whole shard as one array without copying."""
    schema = shard_schema(seq_len, rows.dtype.name)
    sink = pa.BufferOutputStream()
    column = pa.FixedSizeListArray.from_arrays(_arrow(rows.reshape(-1)), seq_len)
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch([column], schema=schema))
    return sink.getvalue().to_pybytes()


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Collects rows into shards of ``shard_rows``; writes each one once, atomically."""

    def __init__(
        self,
        data_dir: str,
        split: str,
        seq_len: int,
        shard_rows: int,
        pad_id: int,
        count_vocab: int | None,
    ) -> None:
        self.data_dir, self.split = data_dir, split
        self.seq_len, self.shard_rows, self.pad_id = seq_len, shard_rows, pad_id
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.shards: list[ShardRecord] = []
        self.written = self.skipped = 0
        # token counts of the split, when asked for (the train split's feed `frequency`)
        self.counts = np.zeros(count_vocab, np.int64) if count_vocab else None
        os.makedirs(os.path.join(data_dir, split), exist_ok=True)

    def add(self, rows: np.ndarray) -> None:
        while len(rows):
            take = min(len(rows), self.shard_rows - self.pending_rows)
            self.pending.append(rows[:take])
            self.pending_rows += take
            rows = rows[take:]
            if self.pending_rows == self.shard_rows:
                self._emit()

    def close(self) -> list[ShardRecord]:
        if self.pending_rows:
            self._emit()
        return self.shards

    def _emit(self) -> None:
        rows = np.concatenate(self.pending)  # [shard_rows, seq_len]
        self.pending, self.pending_rows = [], 0
        name = f"{self.split}/shard-{len(self.shards):05d}.arrow"
        data = serialize_shard(rows, self.seq_len)
        path = os.path.join(self.data_dir, name)
        if os.path.exists(path) and os.path.getsize(path) == len(data):
            self.skipped += 1
        else:
            write_atomic(path, data)
            self.written += 1
        if self.counts is not None:
            self.counts += np.bincount(rows.reshape(-1), minlength=len(self.counts))
        self.shards.append(
            ShardRecord(
                file=name,
                rows=len(rows),
                tokens=int(np.count_nonzero(rows != self.pad_id)),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )


def write_token_counts(path: str, counts: np.ndarray) -> str:
    """``token_counts.arrow``: columns ``token_id`` (uint32) and ``count`` (uint64)."""
    table = pa.table(
        {
            "token_id": _arrow(np.arange(len(counts), dtype=np.uint32)),
            "count": _arrow(counts.astype(np.uint64)),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    data = sink.getvalue().to_pybytes()
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()
