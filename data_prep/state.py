"""What a DATA_DIR records between runs, and what a new run does with it.

``.data_prep/settings.json`` is the fingerprint of the settings a run was started with
(everything the output bytes depend on). A rerun with the same fingerprint resumes, or
finds the manifest and does nothing; a rerun with another is refused unless
``--overwrite``, which removes data_prep's files first. ``.data_prep/plan.json`` records
the work units of the first run, which every later run and array task keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

from data_prep import FORMAT_VERSION
from data_prep.atomic import TMP_MARK, create_once, write_atomic
from data_prep.builtin_corpus import fingerprint
from data_prep.encode import SPLITS
from data_prep.errors import DataPrepError
from data_prep.manifest import MANIFEST
from data_prep.sources import Segment, Source, Unit, plan_units

WORK_DIR = ".data_prep"
# everything data_prep writes in DATA_DIR: what --overwrite and a failed run remove
OUR_FILES = (
    MANIFEST,
    "tokenizer.model",
    "tokenizer.vocab",
    "tokenizer",  # a Hugging Face tokenizer's files
    "token_counts.arrow",
    "train",
    "valid",
    WORK_DIR,
)


def settings_fingerprint(
    args: argparse.Namespace,
    sources: list[Source],
    builtins: list[str],
    tokenizer_sha: str | None,
    vocab_size: int,
) -> dict:
    """Everything the output bytes depend on (workers and unit sizes do not).
    ``tokenizer_sha``: a given tokenizer's hash (GivenTokenizer.sha256), None to train one."""
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


def remove_ours(out: str) -> None:
    """Remove every file data_prep writes in DATA_DIR (and nothing else there)."""
    for name in OUR_FILES:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def prepare_output(
    out: str, settings: dict, overwrite: bool, shared: bool
) -> tuple[bool, dict | None]:
    """Check DATA_DIR against the settings and record them. Returns (created, finished
    manifest or None). ``shared``: array tasks may be writing in DATA_DIR right now."""
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
        remove_ours(out)
    os.makedirs(os.path.join(out, WORK_DIR), exist_ok=True)
    # temporary files left by a killed run; not when other tasks may be writing theirs
    for sub in [] if shared else [WORK_DIR, *SPLITS]:
        folder = os.path.join(out, sub)
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            path = os.path.join(folder, name)
            if TMP_MARK in name and os.path.isdir(path):  # a tokenizer/ being copied
                shutil.rmtree(path)
            elif TMP_MARK in name:
                os.remove(path)
    write_atomic(settings_path, (json.dumps(settings, indent=2) + "\n").encode())
    return created, None


def discard_failed_run(out: str, created: bool, shared: bool) -> None:
    """After bad input found mid-way: leave DATA_DIR as it was before the run."""
    if shared:
        return  # other tasks' work is there; the failed unit left no file behind
    if created:
        shutil.rmtree(out, ignore_errors=True)
    else:
        remove_ours(out)


def unit_plan(
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
