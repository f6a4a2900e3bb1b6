"""``manifest.json``: the contract between data_prep and everything that reads its output.

```
{
  "format_version": 1,
  "seq_len": 128, "vocab_size": 8000, "dtype": "uint16",
  "special_ids": {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4},
  "tokenizer": {"kind": "sentencepiece", "file": "tokenizer.model", "sha256": "...",
                "trained": true, "source": null},
  "token_counts": {"file": "token_counts.arrow", "sha256": "..."},
  "splits": {"train": {"rows": R, "tokens": T, "docs": D,
                       "shards": [{"file": "train/shard-00000.arrow", "rows": r,
                                   "tokens": t, "sha256": "...", "bytes": b}, ...]},
             "valid": {...}},
  "sources": [{"path": "...", "bytes": n}, ...],
  "settings": {...},            # what a rerun compares against
  "stats": {...},               # input bytes, text bytes, invalid UTF-8 replacements, seconds
  "command": "python -m data_prep ..."
}
```

The tokenizer of a ``--tokenizer`` Hugging Face directory is recorded as
``{"kind": "huggingface", "dir": "tokenizer", "class": "BertTokenizer", "files": {name:
sha256}, "sha256": "...", "trained": false, "source": "..."}``: its files, copied
unchanged into ``DATA_DIR/tokenizer/``, and one hash over them
(:func:`data_prep.tokenizer.files_sha256`). A manifest without ``kind`` is sentencepiece.

``tokens`` counts non-padding positions. Shards are Arrow IPC files with one column
``input_ids: fixed_size_list<uint16|uint32>[seq_len]``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from data_prep import FORMAT_VERSION
from data_prep.atomic import write_atomic
from data_prep.errors import DataPrepError

MANIFEST = "manifest.json"
# the kinds of tokenizer a manifest's "tokenizer" section names (data_prep.tokenizer)
SENTENCEPIECE, HUGGINGFACE = "sentencepiece", "huggingface"


@dataclass(frozen=True)
class SpecialTokens:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    @property
    def all(self) -> tuple[int, ...]:
        return (self.pad, self.unk, self.cls, self.sep, self.mask)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest; ``raw`` holds every field as written."""

    data_dir: str
    raw: dict

    @property
    def seq_len(self) -> int:
        return self.raw["seq_len"]

    @property
    def vocab_size(self) -> int:
        return self.raw["vocab_size"]

    @property
    def special(self) -> SpecialTokens:
        return SpecialTokens(**self.raw["special_ids"])

    @property
    def tokenizer_kind(self) -> str:
        """``sentencepiece`` or ``huggingface`` (see data_prep.tokenizer)."""
        return self.raw["tokenizer"].get("kind", SENTENCEPIECE)

    @property
    def tokenizer_path(self) -> str:
        """The SentencePiece model file, or the Hugging Face tokenizer's directory."""
        section = self.raw["tokenizer"]
        name = section["dir"] if self.tokenizer_kind == HUGGINGFACE else section["file"]
        return os.path.join(self.data_dir, name)

    @property
    def sha256(self) -> str:
        """Hash of the manifest's content: identifies the dataset (for checkpoints)."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()

    def split(self, name: str) -> dict:
        return self.raw["splits"][name]

    def shard_paths(self, split: str) -> list[str]:
        return [os.path.join(self.data_dir, s["file"]) for s in self.split(split)["shards"]]

    def token_counts(self) -> np.ndarray:
        """Count of every token id in the train split: int64 [vocab_size]."""
        import pyarrow as pa

        path = os.path.join(self.data_dir, self.raw["token_counts"]["file"])
        with pa.memory_map(path) as source:
            table = pa.ipc.open_file(source).read_all()
        return table.column("count").to_numpy().astype(np.int64)


def load_manifest(data_dir: str) -> Manifest:
    """Read and check ``DATA_DIR/manifest.json``; raise DataPrepError saying what is wrong."""
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isdir(data_dir):
        raise DataPrepError(
            f"{data_dir}: no such data directory (make one with python -m data_prep)"
        )
    if not os.path.isfile(path):
        raise DataPrepError(
            f"{path}: missing; {data_dir} is not a finished data_prep output "
            "(run python -m data_prep, or finish an interrupted run by running it again)"
        )
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataPrepError(f"{path}: unreadable manifest ({e})") from None
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise DataPrepError(
            f"{path}: format version {version}, this code reads version {FORMAT_VERSION}"
        )
    for key in ("seq_len", "vocab_size", "special_ids", "splits", "tokenizer", "dtype"):
        if key not in raw:
            raise DataPrepError(f"{path}: field {key!r} is missing")
    manifest = Manifest(os.path.abspath(data_dir), raw)
    for split in raw["splits"].values():
        for shard in split["shards"]:
            if not os.path.isfile(os.path.join(data_dir, shard["file"])):
                raise DataPrepError(f"{path}: shard {shard['file']} is missing")
    return manifest


def verify_shards(manifest: Manifest, sha256: bool = False, progress=None) -> None:
    """Check every shard of every split against the manifest before anything reads them:
    present, of the recorded size (manifests that record it), a readable Arrow file of
    sequences of ``seq_len``, of the recorded row count, and (``sha256``) of the recorded
    checksum. Raises DataPrepError naming the first bad file. ``progress(bytes)`` is called
    as a checksum advances."""
    for split in manifest.raw["splits"]:
        for shard in manifest.split(split)["shards"]:
            path = os.path.join(manifest.data_dir, shard["file"])
            where = f"{path} (in {os.path.join(manifest.data_dir, MANIFEST)})"
            if not os.path.isfile(path):
                raise DataPrepError(f"{where}: missing")
            size = os.path.getsize(path)
            if "bytes" in shard and size != shard["bytes"]:
                raise DataPrepError(
                    f"{where}: {size:,} bytes, the manifest says {shard['bytes']:,} "
                    "(truncated or replaced)"
                )
            try:
                rows = len(open_shard(path, manifest.seq_len))
            except (OSError, ValueError) as e:  # pyarrow's errors are both
                raise DataPrepError(f"{where}: not a shard of this data ({e})") from None
            if rows != shard["rows"]:
                raise DataPrepError(f"{where}: {rows} rows, the manifest says {shard['rows']}")
            if sha256 and file_sha256(path, progress) != shard["sha256"]:
                raise DataPrepError(f"{where}: sha256 differs from the manifest's (corrupted)")


def file_sha256(path: str, progress=None) -> str:
    """The sha256 of a file, read in 4 MiB chunks; ``progress(bytes)`` after each."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def open_shard(path: str, seq_len: int) -> np.ndarray:
    """A shard's rows as a read-only, memory-mapped array [rows, seq_len] (no copy)."""
    import pyarrow as pa

    source = pa.memory_map(path)
    reader = pa.ipc.open_file(source)
    if reader.num_record_batches == 1:
        flat = reader.get_batch(0).column(0).flatten()
        return flat.to_numpy(zero_copy_only=True).reshape(-1, seq_len)
    # data_prep writes one batch per shard; a file rewritten by another tool may have
    # several, which costs a copy here
    table = reader.read_all()
    chunks = [c.flatten().to_numpy(zero_copy_only=True) for c in table.column(0).chunks]
    return np.concatenate(chunks).reshape(-1, seq_len)


def build_manifest(
    *,
    seq_len: int,
    vocab_size: int,
    dtype: str,
    special: SpecialTokens,
    tokenizer: dict,
    token_counts_sha256: str,
    splits: dict[str, dict],
    sources: list[dict],
    settings: dict,
    stats: dict,
    command: str,
) -> dict:
    """The manifest's fields, in the order they are written (the layout at the top).

    ``tokenizer`` is the tokenizer section phase 1 made (data_prep.phases.tokenizer_phase).
    """
    return {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "vocab_size": vocab_size,
        "dtype": dtype,
        "special_ids": vars(special),
        "tokenizer": tokenizer,
        "token_counts": {"file": "token_counts.arrow", "sha256": token_counts_sha256},
        "splits": splits,
        "sources": sources,
        "settings": settings,
        "stats": stats,
        "command": command,
    }


def write_manifest(data_dir: str, raw: dict) -> None:
    """Write ``DATA_DIR/manifest.json``, atomically; it is the last file a run writes."""
    write_atomic(os.path.join(data_dir, MANIFEST), (json.dumps(raw, indent=2) + "\n").encode())
