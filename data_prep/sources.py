"""Finding the input files, cutting them into work units, and reading documents.

A *unit* is the piece of the corpus one worker tokenizes: a list of segments (a byte
range of a text file, or a row-group range of a Parquet file), about ``target_bytes``
of input. Units never cut a document, so the documents (and so the output shards) do
not depend on how the corpus was cut: only the work distribution does.

Documents:
- ``.txt``: documents are separated by one or more blank (whitespace-only) lines.
- ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, text in ``text_field``.
- ``.parquet``: one document per row of the ``text_field`` column.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from data_prep.errors import DataPrepError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
BUILTIN_PREFIX = "builtin:"

_READ_BLOCK = 4 << 20  # bytes read at a time inside a segment
_BOUNDARY_SCAN = 16 << 20  # how far planning looks for a document boundary per step
_DOC_SEPARATOR = re.compile(rb"\n[ \t\r\f\v]*\n")


def kind_of(path: str) -> str | None:
    """The input kind of a path by its suffix, or None when unsupported."""
    for suffix in (".jsonl.gz", ".jsonl", ".txt", ".parquet"):
        if path.endswith(suffix):
            return suffix[1:]
    return None


@dataclass(frozen=True)
class Source:
    path: str  # absolute
    kind: str  # txt | jsonl | jsonl.gz | parquet
    size: int
    mtime_ns: int


def resolve_inputs(specs: list[str]) -> list[Source]:
    """Expand files, directories and globs into a sorted, de-duplicated list of sources.

    Builtin corpora (``builtin:NAME``) must have been materialized to a file before
    this is called; see :mod:`data_prep.builtin_corpus`.
    """
    paths: list[str] = []
    for spec in specs:
        if glob.has_magic(spec):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataPrepError(f"{spec}: the pattern matches no file")
            for match in matches:
                if kind_of(match) is None:
                    continue
                paths.append(match)
            if not any(kind_of(m) for m in matches):
                raise DataPrepError(f"{spec}: the pattern matches no {'/'.join(SUFFIXES)} file")
        elif os.path.isdir(spec):
            found = []
            for root, dirs, files in os.walk(spec):
                dirs.sort()
                found += [os.path.join(root, f) for f in sorted(files) if kind_of(f)]
            if not found:
                raise DataPrepError(f"{spec}: the directory holds no {'/'.join(SUFFIXES)} file")
            paths += found
        elif os.path.exists(spec):
            if kind_of(spec) is None:
                raise DataPrepError(
                    f"{spec}: unsupported file type (expected one of {', '.join(SUFFIXES)})"
                )
            paths.append(spec)
        else:
            raise DataPrepError(f"{spec}: no such file or directory")

    sources, seen = [], set()
    for path in paths:
        path = os.path.abspath(path)
        if path in seen:
            continue
        seen.add(path)
        try:
            st = os.stat(path)
            with open(path, "rb"):
                pass
        except OSError as e:
            raise DataPrepError(f"{path}: cannot read ({e.strerror})") from None
        sources.append(Source(path, kind_of(path), st.st_size, st.st_mtime_ns))
    return sources


@dataclass(frozen=True)
class Segment:
    """A piece of one source: bytes [start, end) of a text file, or row groups [start, end)."""

    path: str
    kind: str
    start: int
    end: int


@dataclass
class Unit:
    index: int
    segments: list[Segment] = field(default_factory=list)
    nbytes: int = 0


def plan_units(
    sources: list[Source], target_bytes: int, min_bytes: int | None = None, workers: int = 1
) -> list[Unit]:
    """Cut the sources, in order, into units of about ``target_bytes`` input bytes.

    With ``min_bytes``, the units near the end shrink: a unit takes at most 1/(2 x
    ``workers``) of what remains of the corpus, and no less than ``min_bytes``. Workers
    take units in order, so the last ones decide how long the fastest worker waits for
    the slowest; small last units keep that wait short without making every unit small.
    """
    units = [Unit(0)]
    left = sum(src.size for src in sources)  # bytes not yet in a unit

    def target(remaining: int) -> int:
        if min_bytes is None:
            return target_bytes
        return max(min_bytes, min(target_bytes, remaining // (2 * workers)))

    def add(segment: Segment, nbytes: int) -> None:
        nonlocal left
        current = units[-1].nbytes
        t = target(left + current)
        if current >= t or (current and current + nbytes > t + t // 2):
            units.append(Unit(len(units)))
        units[-1].segments.append(segment)
        units[-1].nbytes += nbytes
        left -= nbytes

    for src in sources:
        if src.size == 0:
            continue
        after = left - src.size  # bytes of the sources behind this one
        if src.kind in ("txt", "jsonl"):
            size = src.size
            for start, end in _split_text_file(
                src, lambda pos, a=after, n=size: target(a + n - pos)
            ):
                add(Segment(src.path, src.kind, start, end), end - start)
        elif src.kind == "jsonl.gz":  # not seekable: one segment
            add(Segment(src.path, src.kind, 0, src.size), src.size)
        else:  # row groups; their sizes are uncompressed, so ``left`` is set anew below
            for start, end, nbytes in _split_parquet(src, target(left)):
                add(Segment(src.path, src.kind, start, end), nbytes)
        left = after
    return [u for u in units if u.segments]


def _split_text_file(src: Source, target_at) -> list[tuple[int, int]]:
    """Byte ranges of a text file that start and end on document boundaries; a range
    starting at ``pos`` holds about ``target_at(pos)`` bytes."""
    cuts = [0]
    with open(src.path, "rb") as f:
        while src.size - cuts[-1] > (t := target_at(cuts[-1])) + t // 2:
            cut = _next_boundary(f, cuts[-1] + t, src.kind, src.size)
            if cut is None or cut >= src.size:
                break
            cuts.append(cut)
    cuts.append(src.size)
    return list(zip(cuts[:-1], cuts[1:]))


def _next_boundary(f, pos: int, kind: str, size: int) -> int | None:
    """The first document boundary at or after ``pos``: the start of a blank line (txt)
    or of a line (jsonl)."""
    f.seek(pos)
    f.readline()  # finish the line we landed in
    offset = f.tell()
    if kind == "jsonl":
        return offset
    while offset < size:
        line = f.readline(_BOUNDARY_SCAN)
        if not line:
            return None
        if not line.strip():
            return offset
        offset += len(line)
    return None


def _split_parquet(src: Source, target_bytes: int) -> list[tuple[int, int, int]]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(src.path).metadata
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataPrepError(f"{src.path}: not a readable Parquet file ({e})") from None
    ranges, start, acc = [], 0, 0
    for g in range(meta.num_row_groups):
        acc += meta.row_group(g).total_byte_size
        if acc >= target_bytes:
            ranges.append((start, g + 1, acc))
            start, acc = g + 1, 0
    if start < meta.num_row_groups:
        ranges.append((start, meta.num_row_groups, acc))
    return ranges


# ---------------------------------------------------------------------------------------
# Reading documents


class Utf8Counter:
    """Decodes UTF-8 with replacement, counting the invalid byte sequences replaced."""

    def __init__(self) -> None:
        self.replaced = 0
        self._name = f"data_prep_count_{id(self)}"
        codecs.register_error(self._name, self._handle)

    def _handle(self, exc: UnicodeDecodeError):
        self.replaced += 1
        return "\ufffd", exc.end

    def decode(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("utf-8", errors=self._name)


def _line_number(path: str, offset: int, opener=open) -> int:
    """1-based line number of byte ``offset`` (only computed when reporting an error)."""
    count, done = 1, 0
    with opener(path, "rb") as f:
        while done < offset:
            block = f.read(min(_READ_BLOCK, offset - done))
            if not block:
                break
            count += block.count(b"\n")
            done += len(block)
    return count


def _binary_error(path: str, offset: int, opener=open) -> DataPrepError:
    return DataPrepError(
        f"{path}:{_line_number(path, offset, opener)}: binary data (a NUL byte); "
        "data_prep reads text files only"
    )


def _blocks(segment: Segment) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) blocks of a text segment."""
    opener = gzip.open if segment.kind == "jsonl.gz" else open
    try:
        with opener(segment.path, "rb") as f:
            if segment.start:
                f.seek(segment.start)
            offset = segment.start
            while offset < segment.end or segment.kind == "jsonl.gz":
                want = (
                    _READ_BLOCK
                    if segment.kind == "jsonl.gz"
                    else min(_READ_BLOCK, segment.end - offset)
                )
                block = f.read(want)
                if not block:
                    return
                nul = block.find(b"\x00")
                if nul >= 0:
                    raise _binary_error(segment.path, offset + nul, opener)
                yield offset, block
                offset += len(block)
    except (OSError, EOFError) as e:
        if isinstance(e, (gzip.BadGzipFile, EOFError)):
            raise DataPrepError(f"{segment.path}: not a valid gzip file ({e})") from None
        raise DataPrepError(f"{segment.path}: cannot read ({e})") from None


def iter_documents(segment: Segment, text_field: str, utf8: Utf8Counter) -> Iterator[bytes]:
    """The documents of one segment, in file order, as stripped, non-empty, valid UTF-8
    bytes (invalid sequences replaced)."""
    for batch in iter_document_batches(segment, text_field, utf8):
        yield from batch


def iter_document_batches(
    segment: Segment, text_field: str, utf8: Utf8Counter
) -> Iterator[list[bytes]]:
    """The documents of :func:`iter_documents`, a few MB of them at a time.

    Bytes, not str: SentencePiece takes them as they are, and text that is already valid
    UTF-8 is never decoded and encoded again. Batches, not single documents: at a few
    hundred bytes a document, a generator step per document costs as much as the
    reading itself.
    """
    if segment.kind == "txt":
        yield from _txt_batches(segment, utf8)
        return
    if segment.kind in ("jsonl", "jsonl.gz"):
        texts = _jsonl_documents(segment, text_field, utf8)
    else:
        texts = _parquet_documents(segment, text_field)
    batch: list[bytes] = []
    size = 0
    for text in texts:
        batch.append(text.encode("utf-8", "replace"))  # "?" for a lone surrogate escape
        size += len(batch[-1])
        if size >= _READ_BLOCK:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# what str.strip() removes from ASCII text, so that both paths below strip alike
_ASCII_WHITESPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


def _clean(pieces: list[bytes], utf8: Utf8Counter) -> list[bytes]:
    """Stripped, non-empty, valid UTF-8 documents from raw pieces of a text file."""
    if all(map(bytes.isascii, pieces)):  # the common case: valid UTF-8, nothing to decode
        return [doc for piece in pieces if (doc := piece.strip(_ASCII_WHITESPACE))]
    docs = (
        piece.strip(_ASCII_WHITESPACE)
        if piece.isascii()
        else utf8.decode(piece).strip().encode("utf-8")
        for piece in pieces
    )
    return [doc for doc in docs if doc]


def _txt_batches(segment: Segment, utf8: Utf8Counter) -> Iterator[list[bytes]]:
    carry = b""
    for _, block in _blocks(segment):
        pieces = _DOC_SEPARATOR.split(carry + block)
        carry = pieces.pop()
        docs = _clean(pieces, utf8)
        if docs:
            yield docs
    docs = _clean([carry], utf8)
    if docs:
        yield docs


def _jsonl_documents(segment: Segment, text_field: str, utf8: Utf8Counter) -> Iterator[str]:
    carry, carry_offset = b"", segment.start
    for offset, block in _blocks(segment):
        data = carry + block
        data_offset = carry_offset if carry else offset
        lines = data.split(b"\n")
        carry = lines.pop()
        pos = data_offset
        for line in lines:
            text = _json_text(line, segment, pos, text_field, utf8)
            pos += len(line) + 1
            if text:
                yield text
        carry_offset = pos
    text = _json_text(carry, segment, carry_offset, text_field, utf8)
    if text:
        yield text


def _json_text(line: bytes, segment: Segment, offset: int, text_field: str, utf8: Utf8Counter):
    if not line.strip():
        return None

    def where() -> str:
        opener = gzip.open if segment.kind == "jsonl.gz" else open
        return f"{segment.path}:{_line_number(segment.path, offset, opener)}"

    try:
        record = json.loads(utf8.decode(line))
    except json.JSONDecodeError as e:
        raise DataPrepError(f"{where()}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise DataPrepError(
            f"{where()}: no {text_field!r} field (choose the field with --text-field)"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise DataPrepError(
            f"{where()}: field {text_field!r} is {type(text).__name__}, not a string"
        )
    return text.strip()


def _parquet_documents(segment: Segment, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(segment.path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataPrepError(
            f"{segment.path}: no column {text_field!r} (columns: {', '.join(names)}; "
            "choose one with --text-field)"
        )
    column_type = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataPrepError(
            f"{segment.path}: column {text_field!r} is {column_type}, not a string column"
        )
    for group in range(segment.start, segment.end):
        table = pf.read_row_group(group, columns=[text_field])
        for text in table.column(0).to_pylist():
            if text is None:
                continue
            if "\x00" in text:
                raise DataPrepError(
                    f"{segment.path}: row group {group}: binary data (a NUL character)"
                )
            text = text.strip()
            if text:
                yield text
