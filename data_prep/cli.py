"""``python -m data_prep``: raw text to a tokenizer and sharded Arrow token files.

This module is the command line: its arguments, the run's set-up, and the summary it
prints at the end. The run itself is three resumable phases inside DATA_DIR, 1 tokenizer,
2 encode and 3 pack (:mod:`data_prep.phases`). ``.data_prep/settings.json`` records
what the run was started with; a rerun with other settings is refused unless
``--overwrite`` (:mod:`data_prep.state`).

Every file is written under a temporary name and renamed when complete
(:mod:`data_prep.atomic`), so a run killed at any point and started again skips what is
finished and ends with the same bytes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from data_prep.builtin_corpus import builtin_name
from data_prep.errors import DataPrepError
from data_prep.manifest import HUGGINGFACE
from data_prep.phases import Job, run_phases
from data_prep.sources import resolve_inputs
from data_prep.state import discard_failed_run, prepare_output, settings_fingerprint
from data_prep.tokenizer import read_given_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Turn raw text into a SentencePiece tokenizer (or take a given one) and "
        "sharded Arrow token files.",
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
        help="pieces of the trained tokenizer (default 8000; with --tokenizer, the "
        "tokenizer's size)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="MODEL",
        help="use this tokenizer instead of training one: a SentencePiece model file with "
        "[PAD] [UNK] [CLS] [SEP] [MASK], or a directory holding a Hugging Face fast "
        "tokenizer (tokenizer.json or a BERT vocab.txt, e.g. the BERT to continue "
        "pretraining) with pad, unk, cls, sep and mask tokens",
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


def run(args: argparse.Namespace, command: str) -> dict | None:
    """Run data_prep; return the manifest (None after a partial --phase). Raises
    DataPrepError on bad input."""
    started = time.time()
    _check_args(args)
    job = _job(args, command, started)
    shared = args.phase == "encode"  # array tasks run side by side in one DATA_DIR
    if shared and not os.path.exists(job.tokenizer_path):
        raise DataPrepError(f"{job.out}: no tokenizer yet; run --phase tokenizer first")
    created, finished = prepare_output(job.out, job.settings, args.overwrite, shared)
    if finished is not None:
        print(
            f"data_prep: {job.out} is up to date with these inputs and settings; nothing to do",
            file=sys.stderr,
        )
        return finished
    try:
        return run_phases(job)
    except DataPrepError:
        discard_failed_run(job.out, created, shared)
        raise


def _job(args: argparse.Namespace, command: str, started: float) -> Job:
    """The run the command line asks for: its inputs found, a --tokenizer read and checked,
    and the settings fingerprinted."""
    builtins = [b for b in map(builtin_name, args.input) if b]
    files = [s for s in args.input if not s.startswith("builtin:")]
    sources = resolve_inputs(files) if files else []

    given = read_given_tokenizer(args.tokenizer) if args.tokenizer else None
    vocab_size = args.vocab_size or 8000
    if given is not None:
        if args.vocab_size is not None and args.vocab_size != given.vocab_size:
            raise DataPrepError(
                f"--vocab-size {args.vocab_size} does not match {args.tokenizer} "
                f"({given.vocab_size} tokens); leave --vocab-size out"
            )
        vocab_size = given.vocab_size

    return Job(
        args=args,
        out=os.path.abspath(args.output),
        sources=sources,
        builtins=builtins,
        vocab_size=vocab_size,
        settings=settings_fingerprint(
            args, sources, builtins, given.sha256 if given else None, vocab_size
        ),
        command=command,
        started=started,
        tokenizer=given,
    )


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
        f"  tokenizer  {manifest['vocab_size']:,} pieces ({_tokenizer_origin(manifest['tokenizer'])}), "
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


def _tokenizer_origin(section: dict) -> str:
    if section.get("kind") == HUGGINGFACE:
        return f"Hugging Face {section['class']}, given"
    return "trained" if section["trained"] else "given"


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
