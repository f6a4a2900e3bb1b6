"""``python -m data_prep``: raw text to a tokenizer and sharded Arrow token files.

The run is three resumable phases inside DATA_DIR:

1. tokenizer: trained on a seeded sample (or copied from ``--tokenizer``);
2. encode: parallel workers tokenize units of the corpus into ``.data_prep/unit-*``;
3. pack: the units' streams, in corpus order, become ``train/`` and ``valid/`` shards,
   then ``token_counts.arrow`` and, last, ``manifest.json``.

Every file is written under a temporary name and renamed when complete, so a run
killed at any point and started again skips what is finished and ends with the same
bytes. ``.data_prep/settings.json`` records what the run was started with; a rerun with
other settings is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import shutil
import sys
import time

import numpy as np

from data_prep import FORMAT_VERSION
from data_prep.builtin_corpus import builtin_name, fingerprint, write_builtin
from data_prep.encode import SPLITS, EncodeSettings, encode_unit, init_worker, unit_done, unit_paths
from data_prep.errors import DataPrepError
from data_prep.manifest import MANIFEST, SpecialTokens, write_manifest
from data_prep.pack import ShardWriter, create_once, write_atomic, write_token_counts
from data_prep.progress import Progress
from data_prep.sources import Segment, Source, Unit, plan_units, resolve_inputs
from data_prep.tokenizer import (
    load_tokenizer_file,
    open_model,
    special_ids,
    train_tokenizer,
    vocab_text,
)

WORK_DIR = ".data_prep"
OUR_FILES = (
    MANIFEST,
    "tokenizer.model",
    "tokenizer.vocab",
    "token_counts.arrow",
    "train",
    "valid",
    WORK_DIR,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Turn raw text into a SentencePiece tokenizer and sharded Arrow token files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="files, directories or globs (.txt, .jsonl, .jsonl.gz, .parquet), "
        "or builtin:python-docstrings",
    )
    p.add_argument("--output", required=True, metavar="DATA_DIR", help="output directory")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, [CLS] included")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="pieces of the trained tokenizer (default 8000; with --tokenizer, the model's size)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="MODEL",
        help="use this SentencePiece model instead of "
        "training one; it must have [PAD] [UNK] [CLS] [SEP] [MASK]",
    )
    p.add_argument(
        "--model-type",
        choices=("unigram", "bpe"),
        default="unigram",
        help="SentencePiece algorithm of the trained tokenizer",
    )
    p.add_argument(
        "--tokenizer-sample-mb",
        type=float,
        default=32.0,
        help="text sampled (seeded) from the corpus to train the tokenizer",
    )
    p.add_argument(
        "--character-coverage",
        type=float,
        default=1.0,
        help="SentencePiece character coverage of the sample (lower it for scripts with "
        "many rare characters); uncovered characters become [UNK]",
    )
    p.add_argument(
        "--byte-fallback",
        action="store_true",
        help="encode characters outside the vocabulary as bytes instead of [UNK]",
    )
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=0.01,
        help="fraction of documents in the validation split",
    )
    p.add_argument("--shard-rows", type=int, default=65536, help="sequences per shard")
    p.add_argument("--seed", type=int, default=0, help="seeds the tokenizer sample and the split")
    p.add_argument(
        "--phase",
        choices=("all", "tokenizer", "encode"),
        default="all",
        help="for job arrays (slurm/prepare_data.sbatch): 'tokenizer' only trains or copies "
        "the tokenizer; 'encode' only tokenizes this task's share of the units (see "
        "--task-index); then a plain run ('all') packs what the tasks encoded",
    )
    p.add_argument("--task-index", type=int, default=0, help="with --phase encode: this task")
    p.add_argument("--task-count", type=int, default=1, help="with --phase encode: tasks in all")
    p.add_argument(
        "--unit-mb",
        type=float,
        default=None,
        help="input MB per work unit (default: chosen from the corpus size and --workers; "
        "the last units are smaller). The first run of a DATA_DIR records its units, and "
        "reruns and array tasks keep them",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace data made with other settings in DATA_DIR"
    )
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.seq_len < 8:
        raise DataPrepError(f"--seq-len {args.seq_len}: must be at least 8")
    if args.vocab_size is not None and args.vocab_size < 16:
        raise DataPrepError(f"--vocab-size {args.vocab_size}: must be at least 16")
    if not 0 <= args.valid_fraction < 1:
        raise DataPrepError(f"--valid-fraction {args.valid_fraction}: must be in [0, 1)")
    if args.workers < 1:
        raise DataPrepError(f"--workers {args.workers}: must be at least 1")
    if args.shard_rows < 1:
        raise DataPrepError(f"--shard-rows {args.shard_rows}: must be at least 1")
    if args.tokenizer_sample_mb <= 0:
        raise DataPrepError("--tokenizer-sample-mb: must be positive")
    if not 0 < args.character_coverage <= 1:
        raise DataPrepError("--character-coverage: must be in (0, 1]")
    if not 0 <= args.task_index < args.task_count:
        raise DataPrepError(f"--task-index {args.task_index}: must be in [0, --task-count)")
    if args.unit_mb is not None and args.unit_mb <= 0:
        raise DataPrepError("--unit-mb: must be positive")


def _settings(
    args: argparse.Namespace,
    sources: list[Source],
    builtins: list[str],
    tokenizer_sha: str | None,
    vocab_size: int,
) -> dict:
    """Everything the output bytes depend on (workers and unit sizes do not)."""
    return {
        "format_version": FORMAT_VERSION,
        "seq_len": args.seq_len,
        "vocab_size": vocab_size,
        "tokenizer": tokenizer_sha
        or {
            "model_type": args.model_type,
            "sample_mb": args.tokenizer_sample_mb,
            "character_coverage": args.character_coverage,
            "byte_fallback": args.byte_fallback,
        },
        "text_field": args.text_field,
        "valid_fraction": args.valid_fraction,
        "shard_rows": args.shard_rows,
        "seed": args.seed,
        "inputs": [fingerprint(b) for b in builtins]
        + [{"path": s.path, "bytes": s.size, "mtime_ns": s.mtime_ns} for s in sources],
    }


def _differences(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = []
    for k in keys[:3]:
        if k == "inputs":
            shown.append("the input files (paths, sizes or times) differ")
        else:
            shown.append(f"{k} was {json.dumps(old.get(k))}, now {json.dumps(new.get(k))}")
    return "; ".join(shown)


def _remove_ours(out: str) -> None:
    for name in OUR_FILES:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _prepare_output(
    out: str, settings: dict, overwrite: bool, shared: bool
) -> tuple[bool, dict | None]:
    """Check DATA_DIR against the settings. Returns (created, finished manifest or None)."""
    manifest_path = os.path.join(out, MANIFEST)
    settings_path = os.path.join(out, WORK_DIR, "settings.json")
    recorded = None
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("settings") == settings:
            return False, manifest
        recorded = manifest.get("settings", {})
    elif os.path.isfile(settings_path):
        with open(settings_path) as f:
            recorded = json.load(f)
    elif os.path.isdir(out) and os.listdir(out):
        raise DataPrepError(
            f"{out}: the directory is not empty and holds no data_prep output; "
            "choose a new or empty --output"
        )
    created = not os.path.isdir(out)
    if recorded is not None and recorded != settings:
        if not overwrite:
            raise DataPrepError(
                f"{out}: holds data made with different settings ({_differences(recorded, settings)}); "
                "pass --overwrite to replace it, or choose another --output"
            )
        _remove_ours(out)
    os.makedirs(os.path.join(out, WORK_DIR), exist_ok=True)
    # temporary files left by a killed run; not when other tasks may be writing theirs
    for sub in [] if shared else [WORK_DIR, *SPLITS]:
        folder = os.path.join(out, sub)
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if ".tmp-" in name:
                os.remove(os.path.join(folder, name))
    write_atomic(settings_path, (json.dumps(settings, indent=2) + "\n").encode())
    return created, None


def run(args: argparse.Namespace, command: str) -> dict | None:
    """Run data_prep; return the manifest (None after a partial --phase). Raises
    DataPrepError on bad input."""
    started = time.time()
    _check_args(args)
    out = os.path.abspath(args.output)
    builtins = [b for b in map(builtin_name, args.input) if b]
    files = [s for s in args.input if not s.startswith("builtin:")]
    sources = resolve_inputs(files) if files else []

    tokenizer_bytes, tokenizer_sp, tokenizer_sha = None, None, None
    vocab_size = args.vocab_size or 8000
    if args.tokenizer:
        tokenizer_bytes, tokenizer_sp = load_tokenizer_file(args.tokenizer)
        model_vocab = tokenizer_sp.get_piece_size()
        if args.vocab_size is not None and args.vocab_size != model_vocab:
            raise DataPrepError(
                f"--vocab-size {args.vocab_size} does not match {args.tokenizer} "
                f"({model_vocab} pieces); leave --vocab-size out"
            )
        vocab_size = model_vocab
        tokenizer_sha = _sha256(tokenizer_bytes)

    settings = _settings(args, sources, builtins, tokenizer_sha, vocab_size)
    shared = args.phase == "encode"  # array tasks run side by side in one DATA_DIR
    if shared and not os.path.isfile(os.path.join(out, "tokenizer.model")):
        raise DataPrepError(f"{out}: no tokenizer yet; run --phase tokenizer first")
    created, finished = _prepare_output(out, settings, args.overwrite, shared)
    if finished is not None:
        print(
            f"data_prep: {out} is up to date with these inputs and settings; nothing to do",
            file=sys.stderr,
        )
        return finished
    try:
        return _run_phases(
            args,
            out,
            sources,
            builtins,
            (tokenizer_bytes, tokenizer_sp),
            vocab_size,
            settings,
            command,
            started,
        )
    except DataPrepError:
        # bad input found mid-way: leave the directory as it was before this run
        if shared:
            pass  # other tasks' work is there; the failed unit left no file behind
        elif created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            _remove_ours(out)
        raise


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _run_phases(
    args, out, sources, builtins, given_tokenizer, vocab_size, settings, command, started
) -> dict | None:
    tokenizer_bytes, sp = given_tokenizer  # (None, None) unless --tokenizer
    work = os.path.join(out, WORK_DIR)
    for name in builtins:
        path = os.path.join(work, f"builtin-{name}.txt")
        if not os.path.exists(path):
            print(f"data_prep: writing the built-in corpus builtin:{name}", file=sys.stderr)
            write_builtin(name, path)
    sources = resolve_inputs([os.path.join(work, f"builtin-{b}.txt") for b in builtins]) + sources
    total_bytes = sum(s.size for s in sources)
    if total_bytes == 0:
        raise DataPrepError("the inputs hold no text (every file is empty)")
    units = _unit_plan(work, sources, args.unit_mb, args.workers, total_bytes)

    # Phase 1: tokenizer
    model_path = os.path.join(out, "tokenizer.model")
    if os.path.exists(model_path):
        with open(model_path, "rb") as f:
            found = f.read()
        if found != tokenizer_bytes:
            tokenizer_bytes, sp = found, open_model(found, model_path)
    else:
        if tokenizer_bytes is None:
            print(
                f"data_prep: training a {args.model_type} tokenizer of {vocab_size} pieces on "
                f"up to {args.tokenizer_sample_mb:g} MB of the corpus",
                file=sys.stderr,
            )
            tokenizer_bytes = train_tokenizer(
                sources,
                vocab_size,
                args.model_type,
                int(args.tokenizer_sample_mb * 1e6),
                args.seed,
                args.text_field,
                args.character_coverage,
                args.byte_fallback,
            )
            sp = open_model(tokenizer_bytes, model_path)
        write_atomic(os.path.join(out, "tokenizer.vocab"), vocab_text(sp))
        write_atomic(model_path, tokenizer_bytes)
    special = SpecialTokens(**special_ids(sp, model_path))
    dtype = "uint16" if vocab_size <= 65535 else "uint32"
    enc = EncodeSettings(work, args.text_field, args.seed, args.valid_fraction, dtype, special.sep)
    if args.phase == "tokenizer":
        return None
    if args.phase == "encode":
        mine = [u for u in units if u.index % args.task_count == args.task_index]
        for _ in _encode_in_order(
            mine, enc, tokenizer_bytes, args.workers, sum(u.nbytes for u in mine)
        ):
            pass
        return None

    # Phases 2 and 3: workers encode units while this process packs them, in corpus order
    writers = {
        split: ShardWriter(
            out,
            split,
            args.seq_len,
            args.shard_rows,
            dtype,
            special.cls,
            special.pad,
            vocab_size if split == "train" else None,
        )
        for split in SPLITS
    }
    stats = []
    encode_started = time.time()
    for st in _encode_in_order(units, enc, tokenizer_bytes, args.workers, total_bytes):
        if not stats:
            # packing's pyarrow (~25 ms), imported while the workers encode the next units:
            # for a small corpus, the first shard is full only after the last unit
            import pyarrow  # noqa: F401
        stats.append(st)
        for split in SPLITS:
            path = unit_paths(work, st["unit"])[split]
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
    counts_sha = write_token_counts(os.path.join(out, "token_counts.arrow"), counts)

    manifest = {
        "format_version": FORMAT_VERSION,
        "seq_len": args.seq_len,
        "vocab_size": vocab_size,
        "dtype": dtype,
        "special_ids": vars(special),
        "tokenizer": {
            "file": "tokenizer.model",
            "sha256": _sha256(tokenizer_bytes),
            "trained": args.tokenizer is None,
            "source": args.tokenizer,
        },
        "token_counts": {"file": "token_counts.arrow", "sha256": counts_sha},
        "splits": splits,
        "sources": [{"path": f"builtin:{b}"} for b in builtins]
        + [{"path": s.path, "bytes": s.size} for s in sources if not s.path.startswith(work)],
        "settings": settings,
        "stats": {
            "input_bytes": total_bytes,
            "text_bytes": sum(st["text_bytes"] for st in stats),
            "invalid_utf8_replaced": sum(st["invalid_utf8"] for st in stats),
            "seconds": round(time.time() - started, 2),
            # of which encoding (and packing alongside it), from worker start to the last unit
            "encode_seconds": round(encode_seconds, 2),
        },
        "command": command,
    }
    write_manifest(out, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _unit_plan(
    work: str, sources: list[Source], unit_mb: float | None, workers: int, total_bytes: int
) -> list[Unit]:
    """The units of this DATA_DIR: planned by its first run and recorded in
    ``.data_prep/plan.json``, then read back by every run (and array task) whatever its
    --workers and --unit-mb. A finished unit's files hold the tokens of the segments it
    was planned with, so a rerun that planned anew could pack them under other indices.
    """
    path = os.path.join(work, "plan.json")
    if not os.path.exists(path):
        if unit_mb:
            unit_bytes = int(unit_mb * 1e6)
        else:
            unit_bytes = int(min(64 << 20, max(1 << 20, total_bytes // (workers * 8))))
        units = plan_units(sources, unit_bytes, min(unit_bytes, 1 << 20), workers)
        plan = [
            {"bytes": u.nbytes, "segments": [[s.path, s.kind, s.start, s.end] for s in u.segments]}
            for u in units
        ]
        create_once(path, json.dumps(plan).encode())  # array tasks may race to here
    with open(path) as f:
        plan = json.load(f)
    return [
        Unit(i, [Segment(*segment) for segment in u["segments"]], u["bytes"])
        for i, u in enumerate(plan)
    ]


def _encode_in_order(
    units, enc: EncodeSettings, model_bytes: bytes, workers: int, total_bytes: int
):
    """Yield every unit's stats in unit order, encoding those not done yet in parallel."""
    done_bytes = sum(u.nbytes for u in units if unit_done(enc.work_dir, u.index) is not None)
    if workers == 1:
        init_worker(model_bytes)
        results = (encode_unit(u, enc) for u in units)
        pool = None
    else:
        ctx = multiprocessing.get_context("fork")
        pool = ctx.Pool(min(workers, len(units)), initializer=init_worker, initargs=(model_bytes,))
        results = pool.imap(_encode_job, [(u, enc) for u in units])
    progress = Progress(total_bytes, done_bytes)
    try:
        for st in results:
            progress.update(st["bytes"], sum(st["tokens"].values()))
            yield st
    finally:
        if pool is not None:
            pool.terminate()
        progress.close()


def _encode_job(job):
    return encode_unit(*job)


def _summary(manifest: dict, out: str) -> str:
    st = manifest["stats"]
    lines = [
        f"data_prep: done in {st['seconds']:.1f} s -> {out}",
        f"  input      {st['input_bytes'] / 1e6:,.1f} MB, {st['text_bytes'] / 1e6:,.1f} MB of text"
        + (
            f", {st['invalid_utf8_replaced']:,} invalid UTF-8 sequences replaced"
            if st["invalid_utf8_replaced"]
            else ""
        ),
        f"  tokenizer  {manifest['vocab_size']:,} pieces ({'trained' if manifest['tokenizer']['trained'] else 'given'}), "
        f"specials {manifest['special_ids']}",
        f"  sequences  seq_len {manifest['seq_len']}, {manifest['dtype']}",
    ]
    for split, info in manifest["splits"].items():
        pad = 1 - info["tokens"] / max(info["rows"] * manifest["seq_len"], 1)
        lines.append(
            f"  {split:<10} {info['docs']:,} docs, {info['rows']:,} sequences, "
            f"{info['tokens']:,} tokens in {len(info['shards'])} shard(s), padding {pad:.2%}"
        )
    if st["seconds"] > 0:
        total = sum(i["tokens"] for i in manifest["splits"].values())
        line = (
            f"  throughput {st['input_bytes'] / 1e6 / st['seconds']:,.2f} MB/s, "
            f"{total / st['seconds']:,.0f} tokens/s"
        )
        if manifest["tokenizer"]["trained"] and st["encode_seconds"] > 0:
            line += (
                f" (tokenizer training included; encoding and packing alone "
                f"{st['input_bytes'] / 1e6 / st['encode_seconds']:,.2f} MB/s)"
            )
        lines.append(line)
    lines.append(f"  inspect    python -m data_prep.inspect {out}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command = "python -m data_prep " + shlex.join(argv)
    try:
        manifest = run(args, command)
    except DataPrepError as e:
        print(f"data_prep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("data_prep: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    if manifest is None:
        print(
            f"data_prep: --phase {args.phase} done (task {args.task_index} of {args.task_count})"
            if args.phase == "encode"
            else "data_prep: --phase tokenizer done",
            file=sys.stderr,
        )
    else:
        print(_summary(manifest, os.path.abspath(args.output)))
    return 0
