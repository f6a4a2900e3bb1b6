"""The three phases of a run, inside a DATA_DIR that :mod:`data_prep.state` prepared.

1. tokenizer: trained on a seeded sample, or copied from ``--tokenizer`` (a SentencePiece
   model to ``tokenizer.model``, a Hugging Face tokenizer's files to ``tokenizer/``);
2. encode: parallel workers tokenize units of the corpus into ``.data_prep/unit-*``;
3. pack: the units' streams, in corpus order, become ``train/`` and ``valid/`` shards,
   then ``token_counts.arrow`` and, last, ``manifest.json``.

In a plain run phases 2 and 3 overlap: this process packs each unit as the workers
finish it. ``--phase tokenizer`` stops after phase 1; ``--phase encode`` runs phase 2
on one array task's share of the units.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data_prep.atomic import TMP_MARK, replace_directory, write_atomic
from data_prep.builtin_corpus import write_builtin
from data_prep.encode import SPLITS, EncodeSettings, encode_unit, init_worker, unit_done, unit_paths
from data_prep.errors import DataPrepError
from data_prep.manifest import (
    HUGGINGFACE,
    SENTENCEPIECE,
    SpecialTokens,
    build_manifest,
    file_sha256,
    write_manifest,
)
from data_prep.pack import ShardWriter, write_token_counts
from data_prep.progress import Progress
from data_prep.sources import Source, Unit, resolve_inputs
from data_prep.state import WORK_DIR, unit_plan
from data_prep.tokenizer import (
    HF_DIR,
    SP_MODEL_FILE,
    GivenTokenizer,
    file_hashes,
    open_model,
    open_tokenizer,
    train_tokenizer,
    vocab_text,
)


@dataclass(frozen=True)
class Job:
    """One ``python -m data_prep`` run, fixed before the phases start."""

    args: argparse.Namespace  # the checked command line
    out: str  # DATA_DIR, absolute
    sources: list[Source]  # the input files (the built-in corpora are written later)
    builtins: list[str]  # names of the ``builtin:`` corpora among the inputs
    vocab_size: int
    settings: dict  # data_prep.state.settings_fingerprint
    command: str  # as the manifest records it
    started: float  # time.time() at the start of the run
    tokenizer: GivenTokenizer | None = None  # the --tokenizer, if one was given

    @property
    def work(self) -> str:
        return os.path.join(self.out, WORK_DIR)

    @property
    def tokenizer_path(self) -> str:
        """Where phase 1 puts the tokenizer: ``tokenizer.model`` or ``tokenizer/``."""
        hf = self.tokenizer is not None and self.tokenizer.kind == HUGGINGFACE
        return os.path.join(self.out, HF_DIR if hf else SP_MODEL_FILE)


def run_phases(job: Job) -> dict | None:
    """Run the phases ``--phase`` asks for; return the manifest, or None when the run
    stops before phase 3 (``--phase tokenizer`` or ``--phase encode``)."""
    args = job.args
    sources = _with_builtins(job)
    total_bytes = sum(s.size for s in sources)
    if total_bytes == 0:
        raise DataPrepError("the inputs hold no text (every file is empty)")
    units = unit_plan(job.work, sources, args.unit_mb, args.workers, total_bytes)

    tokenizer, special = tokenizer_phase(job, sources)
    dtype = "uint16" if job.vocab_size <= 65535 else "uint32"
    enc = EncodeSettings(
        job.work, args.text_field, args.seed, args.valid_fraction, dtype, special.sep
    )
    if args.phase == "tokenizer":
        return None
    if args.phase == "encode":
        mine = [u for u in units if u.index % args.task_count == args.task_index]
        for _ in encode_in_order(
            mine, enc, job.out, tokenizer, args.workers, sum(u.nbytes for u in mine)
        ):
            pass
        return None
    return encode_and_pack(job, sources, units, enc, tokenizer, special, total_bytes)


def _with_builtins(job: Job) -> list[Source]:
    """The inputs with the built-in corpora first, written into the work folder once."""
    for name in job.builtins:
        path = os.path.join(job.work, f"builtin-{name}.txt")
        if not os.path.exists(path):
            print(f"data_prep: writing the built-in corpus builtin:{name}", file=sys.stderr)
            write_builtin(name, path)
    builtin_files = [os.path.join(job.work, f"builtin-{b}.txt") for b in job.builtins]
    return resolve_inputs(builtin_files) + job.sources


def tokenizer_phase(job: Job, sources: list[Source]) -> tuple[dict, SpecialTokens]:
    """Phase 1: the tokenizer in DATA_DIR; returns its manifest section and special ids.

    A SentencePiece model (``tokenizer.model`` and ``tokenizer.vocab``) is trained on a
    sample of ``sources`` or copied from ``--tokenizer``; a model already there (from an
    earlier run or the tokenizer job) is kept. A Hugging Face tokenizer's files are
    copied into ``tokenizer/``, unless it holds them already.
    """
    args, given = job.args, job.tokenizer
    if given is not None and given.kind == HUGGINGFACE:
        hashes = file_hashes(given.files)
        if _stored_hashes(job.tokenizer_path) != hashes:
            tmp = os.path.join(job.work, f"{HF_DIR}{TMP_MARK}{os.getpid()}")
            os.makedirs(tmp)
            for name, data in given.files.items():
                write_atomic(os.path.join(tmp, name), data)
            replace_directory(tmp, job.tokenizer_path)
        section = {
            "kind": HUGGINGFACE,
            "dir": HF_DIR,
            "class": given.hf_class,
            "files": hashes,
            "sha256": given.sha256,
            "trained": False,
            "source": given.source,
        }
    else:
        model_bytes = _sentencepiece_model(job, sources)
        section = {
            "kind": SENTENCEPIECE,
            "file": SP_MODEL_FILE,
            "sha256": hashlib.sha256(model_bytes).hexdigest(),
            "trained": given is None,
            "source": args.tokenizer,
        }
    tokenizer = open_tokenizer(job.out, section)
    return section, SpecialTokens(**tokenizer.special_ids())


def _stored_hashes(folder: str) -> dict[str, str] | None:
    if not os.path.isdir(folder):
        return None
    return {name: file_sha256(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def _sentencepiece_model(job: Job, sources: list[Source]) -> bytes:
    """``tokenizer.model`` (and ``tokenizer.vocab``): kept, copied or trained; its bytes."""
    args = job.args
    model_path = job.tokenizer_path
    if os.path.exists(model_path):
        with open(model_path, "rb") as f:
            return f.read()
    if job.tokenizer is not None:
        model_bytes = job.tokenizer.files[SP_MODEL_FILE]
    else:
        print(
            f"data_prep: training a {args.model_type} tokenizer of {job.vocab_size} pieces "
            f"on up to {args.tokenizer_sample_mb:g} MB of the corpus",
            file=sys.stderr,
        )
        model_bytes = train_tokenizer(
            sources,
            job.vocab_size,
            args.model_type,
            int(args.tokenizer_sample_mb * 1e6),
            args.seed,
            args.text_field,
            args.character_coverage,
            args.byte_fallback,
        )
    write_atomic(
        os.path.join(job.out, "tokenizer.vocab"), vocab_text(open_model(model_bytes, model_path))
    )
    write_atomic(model_path, model_bytes)
    return model_bytes


def encode_in_order(
    units: list[Unit],
    enc: EncodeSettings,
    data_dir: str,
    tokenizer: dict,
    workers: int,
    total_bytes: int,
) -> Iterator[dict]:
    """Phase 2: yield every unit's stats in unit order, encoding those not done yet in
    parallel with DATA_DIR's tokenizer (``tokenizer``: its manifest section)."""
    done_bytes = sum(u.nbytes for u in units if unit_done(enc.work_dir, u.index) is not None)
    if workers == 1:
        init_worker(data_dir, tokenizer)
        results = (encode_unit(u, enc) for u in units)
        pool = None
    else:
        ctx = multiprocessing.get_context("fork")
        pool = ctx.Pool(
            min(workers, len(units)), initializer=init_worker, initargs=(data_dir, tokenizer)
        )
        results = pool.imap(_encode_in_worker, [(u, enc) for u in units])
    progress = Progress(total_bytes, done_bytes)
    try:
        for st in results:
            progress.update(st["bytes"], sum(st["tokens"].values()))
            yield st
    finally:
        if pool is not None:
            pool.terminate()
        progress.close()


def _encode_in_worker(task: tuple[Unit, EncodeSettings]) -> dict:
    return encode_unit(*task)


def encode_and_pack(
    job: Job,
    sources: list[Source],
    units: list[Unit],
    enc: EncodeSettings,
    tokenizer: dict,
    special: SpecialTokens,
    total_bytes: int,
) -> dict:
    """Phases 2 and 3 together: workers encode units while this process packs them, in
    corpus order, into shards; then the token counts and the manifest. Returns the
    manifest."""
    args, dtype = job.args, enc.dtype
    writers = {
        split: ShardWriter(
            job.out,
            split,
            args.seq_len,
            args.shard_rows,
            dtype,
            special.cls,
            special.pad,
            job.vocab_size if split == "train" else None,
        )
        for split in SPLITS
    }
    stats = []
    encode_started = time.time()
    for st in encode_in_order(units, enc, job.out, tokenizer, args.workers, total_bytes):
        if not stats:
            # pyarrow, for the shards: loaded while the workers encode the next units
            import pyarrow  # noqa: F401
        stats.append(st)
        for split in SPLITS:
            path = unit_paths(job.work, st["unit"])[split]
            # mapped, not read: the tokens are copied once, from the page cache into the shard
            tokens = np.memmap(path, dtype, "r") if st["tokens"][split] else np.empty(0, dtype)
            writers[split].feed(tokens)
    encode_seconds = time.time() - encode_started
    splits = {}
    for split in SPLITS:
        shards = writers[split].close()
        splits[split] = {
            "rows": sum(s.rows for s in shards),
            "tokens": sum(s.tokens for s in shards),
            "docs": sum(st["docs"][split] for st in stats),
            "shards": [vars(s) for s in shards],
        }
    counts = writers["train"].counts
    counts_sha = write_token_counts(os.path.join(job.out, "token_counts.arrow"), counts)

    manifest = build_manifest(
        seq_len=args.seq_len,
        vocab_size=job.vocab_size,
        dtype=dtype,
        special=special,
        tokenizer=tokenizer,
        token_counts_sha256=counts_sha,
        splits=splits,
        sources=[{"path": f"builtin:{b}"} for b in job.builtins]
        + [{"path": s.path, "bytes": s.size} for s in sources if not s.path.startswith(job.work)],
        settings=job.settings,
        stats={
            "input_bytes": total_bytes,
            "text_bytes": sum(st["text_bytes"] for st in stats),
            "invalid_utf8_replaced": sum(st["invalid_utf8"] for st in stats),
            "seconds": round(time.time() - job.started, 2),
            # of which encoding (and packing alongside it), from worker start to the last unit
            "encode_seconds": round(encode_seconds, 2),
        },
        command=job.command,
    )
    write_manifest(job.out, manifest)
    shutil.rmtree(job.work, ignore_errors=True)
    return manifest
