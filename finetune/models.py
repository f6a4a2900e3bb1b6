"""Which model ``--model`` names: a Hugging Face BERT directory, or a pretraining run.

A RUN_DIR of ``pretrain/run.py`` (it holds ``checkpoints/``) is exported once with
``pretrain.export.export_run`` into ``OUT/exported_model`` and that copy is reused by later
runs into the same OUT. Everything is checked before any training.
"""

from __future__ import annotations

import json
import os
import sys

from finetune.errors import FinetuneError

EXPORTED = "exported_model"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# transformers builds an empty tokenizer from a config alone: require its files
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model")


def is_run_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints")) and not _has_model_type(path)


def _has_model_type(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


def check_hf_dir(path: str) -> dict:
    """The ``config.json`` of a BERT model directory, or a one-line error."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FinetuneError(
            f"--model {path}: no config.json; expected a Hugging Face BERT directory "
            "or a pretraining run directory (with checkpoints/)"
        )
    try:
        with open(config_path) as f:
            config = json.load(f)
    except ValueError as e:
        raise FinetuneError(f"{config_path}: not JSON ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "bert":
        raise FinetuneError(
            f"--model {path}: model_type is {model_type!r} in config.json, not 'bert'; "
            "this command fine-tunes BERT encoders"
        )
    for what, names in (("weights", WEIGHT_FILES), ("tokenizer", TOKENIZER_FILES)):
        if not any(os.path.isfile(os.path.join(path, name)) for name in names):
            raise FinetuneError(f"--model {path}: no {what} ({', '.join(names)})")
    return config


def plan_model(path: str, output: str) -> tuple[str, str | None]:
    """(HF directory to load, RUN_DIR it is exported from or None). Checks only: an export
    that is needed happens in :func:`prepare_model`."""
    if not os.path.isdir(path):
        raise FinetuneError(f"--model {path}: no such directory")
    if not is_run_dir(path):
        check_hf_dir(path)
        return path, None
    exported = os.path.join(output, EXPORTED)
    if not os.path.isfile(os.path.join(exported, "config.json")):
        from pretrain.export import ExportError, checkpoint_of

        try:
            checkpoint_of(path, None)  # a run without a checkpoint fails here, before any work
        except ExportError as e:
            raise FinetuneError(f"--model {path}: {e}") from None
    return exported, path


def prepare_model(hf_dir: str, run_dir: str | None) -> None:
    """Export ``run_dir`` into ``hf_dir`` unless that was done by an earlier run."""
    if run_dir is None:
        check_hf_dir(hf_dir)
        return
    if os.path.isfile(os.path.join(hf_dir, "config.json")):
        print(f"finetune: reusing {hf_dir} (exported from {run_dir})", file=sys.stderr)
    else:
        from pretrain.export import ExportError, export_run

        print(f"finetune: exporting {run_dir} to {hf_dir}", file=sys.stderr)
        try:
            export_run(run_dir, hf_dir, overwrite=True)  # atomic: whole or absent
        except ExportError as e:
            raise FinetuneError(f"--model {run_dir}: {e}") from None
    check_hf_dir(hf_dir)
