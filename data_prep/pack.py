"""Phase 3: pack a split's token stream into fixed-length sequences and Arrow shards.

The stream is every unit's stream concatenated in corpus order (documents already end
in [SEP]). Each sequence is [CLS] followed by the next ``seq_len - 1`` stream tokens,
so long documents continue in the next sequence; only the split's last sequence is
padded, and ``tokens`` in a shard's record counts everything but that padding. Shards
hold ``shard_rows`` sequences in the Arrow IPC file format. A shard that already exists
under its final name is left as it is (a rerun's skip), which is safe because the bytes
are a pure function of the inputs and settings.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from data_prep.atomic import atomic_file, write_atomic

if TYPE_CHECKING:
    import pyarrow as pa

_COUNT_SLICE = 1 << 20  # tokens counted at a time

# pyarrow is imported inside the functions that use it: ``--phase encode`` never needs it


def shard_schema(seq_len: int, dtype: str) -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [pa.field("input_ids", pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), seq_len))]
    )


def _arrow(array: np.ndarray) -> pa.Array:
    """A 1-D numpy array as an Arrow array, without a copy (and without ``pa.array``,
    which imports pandas)."""
    import pyarrow as pa

    array = np.ascontiguousarray(array)
    return pa.Array.from_buffers(
        pa.from_numpy_dtype(array.dtype), len(array), [None, pa.py_buffer(array)]
    )


@dataclass
class ShardRecord:
    file: str  # relative to the data directory
    rows: int
    tokens: int  # non-padding tokens
    sha256: str
    bytes: int  # the file's size


class HashingSink(io.RawIOBase):
    """A write-only stream that hashes (SHA-256) and counts what goes through it, and
    passes it on to ``file`` when one is given. Given to pyarrow, it receives the shard's
    body as the rows' own buffer: the shard is written and hashed in one pass, without
    an in-memory copy of the file."""

    def __init__(self, file=None) -> None:
        super().__init__()
        self.file, self.sha, self.size = file, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.size += view.nbytes
        if self.file is not None:
            self.file.write(view)
        return view.nbytes


def write_shard_ipc(rows: np.ndarray, seq_len: int, out: io.RawIOBase) -> None:
    """The Arrow IPC file bytes of a shard, written to ``out``: one ``input_ids``
    fixed-size-list column, in one record batch, so a reader maps the whole shard as one
    array without copying."""
    import pyarrow as pa

    schema = shard_schema(seq_len, rows.dtype.name)
    column = pa.FixedSizeListArray.from_arrays(_arrow(rows.reshape(-1)), seq_len)
    with pa.ipc.new_file(pa.PythonFile(out, mode="w"), schema) as writer:
        writer.write_batch(pa.record_batch([column], schema=schema))


class ShardWriter:
    """Packs a split's token stream into rows, and the rows into shards written as they fill.

    Each row is [CLS] followed by the next ``seq_len - 1`` stream tokens; the stream is fed
    in pieces of any length. Rows are written straight into the buffer of the shard being
    filled, with no intermediate row arrays.
    """

    def __init__(
        self,
        data_dir: str,
        split: str,
        seq_len: int,
        shard_rows: int,
        dtype: str,
        cls_id: int,
        pad_id: int,
        count_vocab: int | None,
    ) -> None:
        self.data_dir, self.split = data_dir, split
        self.seq_len, self.body, self.pad_id = seq_len, seq_len - 1, pad_id
        # [shard_rows, seq_len], filled row by row: pages not reached are never touched
        self.shard = np.empty((shard_rows, seq_len), dtype)
        self.cls_id = cls_id
        self.filled = 0  # rows of self.shard filled so far
        self.padding = 0  # [PAD]s in those rows
        self.carry = np.empty(0, dtype)  # the start of the next row: < seq_len - 1 tokens
        self.shards: list[ShardRecord] = []
        self.written = self.skipped = 0
        # token counts of the split, when asked for (the train split's feed `frequency`)
        self.counts = np.zeros(count_vocab, np.int64) if count_vocab else None
        os.makedirs(os.path.join(data_dir, split), exist_ok=True)

    def feed(self, tokens: np.ndarray) -> None:
        """Append stream tokens; rows that are complete go into the shard."""
        if self.counts is not None:
            # counted as they come (a unit at a time, while the workers encode the next
            # units), not when a shard is emitted: the last shard is emitted after the
            # last unit, on one core. In slices: bincount widens its input to int64.
            for start in range(0, len(tokens), _COUNT_SLICE):
                piece = tokens[start : start + _COUNT_SLICE]
                self.counts += np.bincount(piece, minlength=len(self.counts))
        if len(self.carry):
            need = self.body - len(self.carry)
            if len(tokens) < need:
                self.carry = np.concatenate([self.carry, tokens])
                return
            self._put(np.concatenate([self.carry, tokens[:need]])[None])
            tokens = tokens[need:]
        full = len(tokens) // self.body
        self._put(tokens[: full * self.body].reshape(full, self.body))
        self.carry = tokens[full * self.body :].copy()

    def close(self) -> list[ShardRecord]:
        """Pad the last row, write the last shard; return every shard's record."""
        if len(self.carry):
            row = np.full((1, self.body), self.pad_id, self.shard.dtype)
            row[0, : len(self.carry)] = self.carry
            self.padding += self.body - len(self.carry)
            if self.counts is not None:
                self.counts[self.pad_id] += self.body - len(self.carry)
            self.carry = self.carry[:0]
            self._put(row)
        if self.filled:
            self._emit()
        return self.shards

    def _put(self, bodies: np.ndarray) -> None:
        """Copy row bodies [n, seq_len - 1] behind a [CLS] each, emitting full shards."""
        while len(bodies):
            take = min(len(bodies), len(self.shard) - self.filled)
            rows = self.shard[self.filled : self.filled + take]
            rows[:, 0] = self.cls_id
            rows[:, 1:] = bodies[:take]
            if self.counts is not None:
                self.counts[self.cls_id] += take
            self.filled += take
            bodies = bodies[take:]
            if self.filled == len(self.shard):
                self._emit()

    def _emit(self) -> None:
        rows = self.shard[: self.filled]  # [rows, seq_len], contiguous
        name = f"{self.split}/shard-{len(self.shards):05d}.arrow"
        path = os.path.join(self.data_dir, name)
        keep = False
        if os.path.exists(path):  # a rerun's: kept if it has the size of these bytes
            sink = HashingSink()
            write_shard_ipc(rows, self.seq_len, sink)
            keep = os.path.getsize(path) == sink.size
        if keep:
            self.skipped += 1
        else:
            with atomic_file(path) as f:
                sink = HashingSink(f)
                write_shard_ipc(rows, self.seq_len, sink)
            self.written += 1
        self.shards.append(
            ShardRecord(
                file=name,
                rows=len(rows),
                tokens=rows.size - self.padding,
                sha256=sink.sha.hexdigest(),
                bytes=sink.size,
            )
        )
        self.filled = self.padding = 0


def write_token_counts(path: str, counts: np.ndarray) -> str:
    """``token_counts.arrow``: columns ``token_id`` (uint32) and ``count`` (uint64)."""
    import pyarrow as pa

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
