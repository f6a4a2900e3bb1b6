"""``python -m finetune``: fine-tune a BERT encoder on GLUE-format tasks, several seeds.

Order of work: every check first (arguments, the model directory, every task's files,
columns and labels, the tokenizer), then per task the baselines (built-in tasks, or
``--baselines``), then per seed fine-tuning and evaluation on dev. ``OUT/results.json`` is
rewritten after each task, so a long multi-task run keeps what it finished; predictions
for test files go to ``OUT/predictions/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

from finetune.errors import FinetuneError
from finetune.train import Settings

RESULTS = "results.json"
FORMAT_VERSION = 1


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except the empty ones (None, False)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.required:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="python -m finetune",
        description="Fine-tune a BERT encoder on GLUE-format tasks and report dev scores "
        "over several seeds.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="HF_DIR|RUN_DIR",
        help="a Hugging Face BERT directory, or a pretraining run (exported to "
        "OUT/exported_model first)",
    )
    p.add_argument(
        "--task",
        required=True,
        metavar="NAME_OR_DIR",
        help="a task directory (train/dev .tsv or .jsonl; GLUE layouts by the directory's "
        "name), a directory of task directories (glue_data/), a GLUE task name looked up in "
        "$GLUE_DIR, or builtin:topic, builtin:word-order, builtin:next-sentence, builtin:all",
    )
    p.add_argument("--output", required=True, metavar="OUT", help="results.json goes here")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds, one run each")
    p.add_argument("--epochs", type=float, default=d.epochs, help="may be fractional")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: 2e-5 for hidden size >= 768, else 1e-4)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step")
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="tokens per example, [CLS] and [SEP]s included (default: 128, or the model's "
        "max_position_embeddings if smaller)",
    )
    p.add_argument(
        "--warmup-ratio",
        type=float,
        default=d.warmup_ratio,
        help="share of the steps with a linear warmup; then linear decay to 0",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help="AdamW's, on all weights but biases and LayerNorm",
    )
    p.add_argument(
        "--text-fields",
        default=None,
        metavar="A[,B]",
        help="the text column, or the pair of them (default: the task's layout)",
    )
    p.add_argument("--label-field", default=None, metavar="L", help="the label column")
    p.add_argument(
        "--regression",
        action="store_true",
        help="treat integer labels as a real-valued target (real-valued ones always are)",
    )
    p.add_argument(
        "--baselines",
        action="store_true",
        help="report majority-class and bag-of-words baselines (always for builtin tasks)",
    )
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    return p


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise FinetuneError(f"--seeds {text}: expected comma-separated integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise FinetuneError(f"--seeds {text}: expected distinct comma-separated integers")
    return seeds


def _check_settings(args) -> tuple[list[int], tuple[str, ...] | None]:
    seeds = _seeds(args.seeds)
    fields = None
    if args.text_fields is not None:
        fields = tuple(f.strip() for f in args.text_fields.split(","))
        if not 1 <= len(fields) <= 2 or not all(fields):
            raise FinetuneError(
                f"--text-fields {args.text_fields}: one column or two, comma-separated"
            )
    for name, value, low in (
        ("--epochs", args.epochs, 0),
        ("--batch-size", args.batch_size, 0),
        ("--lr", args.lr, 0),
        ("--max-seq-len", args.max_seq_len, 3),
    ):
        if value is not None and value <= low:
            raise FinetuneError(f"{name} {value}: must be above {low}")
    if not 0 <= args.warmup_ratio <= 1:
        raise FinetuneError(f"--warmup-ratio {args.warmup_ratio}: must be in [0, 1]")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise FinetuneError(f"--device {args.device}: no CUDA device here")
    elif args.device not in ("auto", "cpu"):
        raise FinetuneError(f"--device {args.device}: expected auto, cpu or cuda[:N]")
    return seeds, fields


def _load_tokenizer(hf_dir: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FinetuneError(f"--model {hf_dir}: no usable tokenizer ({first})") from None
    if tokenizer.pad_token_id is None:
        raise FinetuneError(f"--model {hf_dir}: the tokenizer has no padding token")
    return tokenizer


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _write_json(path: str, obj) -> None:
    from data_prep.atomic import write_atomic

    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def _write_predictions(out: str, task, split, seed: int, predictions: list) -> str:
    directory = os.path.join(out, "predictions", task.name)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{split.name}.seed{seed}.tsv")
    with open(path, "w", encoding="utf-8") as f:
        f.write("index\tprediction\n")
        for index, value in zip(split.ids, predictions):
            f.write(f"{index}\t{value}\n")
    return path


def run_task(task, hf_dir, tokenizer, settings: Settings, seeds, baselines: bool, out: str):
    """Baselines, then fine-tune and evaluate every seed: the task's results.json entry."""
    from finetune import metrics, train

    entry = {
        "source": task.source,
        "layout": task.layout,
        "type": "regression" if task.regression else "classification",
        "text_fields": list(task.text_fields),
        "label_field": task.label_field,
        "labels": task.label_list,
        "examples": {s.name: len(s) for s in (task.train, *(s for _, s in task.evals))},
        "metric_names": task.metric_names(),
    }
    if task.skipped_rows:
        entry["skipped_malformed_rows"] = task.skipped_rows
    if baselines or task.baselines:
        from finetune.baselines import run_baselines

        entry["baselines"] = run_baselines(task)
    encoded_train = train.encode(tokenizer, task.train, settings.max_seq_len)
    encoded_evals = [train.encode(tokenizer, s, settings.max_seq_len) for _, s in task.evals]
    encoded_tests = [train.encode(tokenizer, s, settings.max_seq_len) for s in task.tests]
    per_seed = {name: {} for name in task.metric_names()}
    seconds, predictions = {}, []
    for seed in seeds:
        model, new_weights = train.load_model(task, hf_dir, seed, settings.device)
        if seed == seeds[0] and new_weights:
            print(f"finetune: {task.name}: new weights {', '.join(new_weights)}", file=sys.stderr)
        elapsed = train.finetune(model, task, encoded_train, settings, seed, tokenizer.pad_token_id)
        for (suffix, split), encoded in zip(task.evals, encoded_evals):
            preds = train.predict(model, encoded, task, settings, tokenizer.pad_token_id)
            scores = metrics.compute(task.metrics, split.labels, preds, task.positive_label)
            for name, value in scores.items():
                per_seed[name + suffix][seed] = value
        for split, encoded in zip(task.tests, encoded_tests):
            preds = train.predict(model, encoded, task, settings, tokenizer.pad_token_id)
            predictions.append(_write_predictions(out, task, split, seed, preds))
        seconds[str(seed)] = round(elapsed, 2)
        del model
    entry["metrics"] = {name: metrics.summarize(values) for name, values in per_seed.items()}
    entry["train_seconds"] = seconds
    if predictions:
        entry["test_predictions"] = [os.path.relpath(p, out) for p in predictions]
    return entry


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(results: dict) -> str:
    """The printed summary: each task's metrics x100, per seed, mean +- std, baselines."""
    seeds = [str(s) for s in results["settings"]["seeds"]]
    rows = [["task", "metric", *(f"seed {s}" for s in seeds), "mean", "std", "majority", "bow"]]
    for name, entry in results["tasks"].items():
        base = entry.get("baselines", {})
        for metric, summary in entry["metrics"].items():
            rows.append(
                [
                    name,
                    metric,
                    *(_pct(summary["per_seed"][s]) for s in seeds),
                    _pct(summary["mean"]),
                    _pct(summary["std"]),
                    _pct(base["majority"][metric]) if base else "",
                    _pct(base["bow"][metric]) if base else "",
                ]
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]]) + "\n(scores x100)"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only: never download
    args = build_parser().parse_args(argv)
    try:
        from finetune.models import plan_model, prepare_model
        from finetune.tasks import load_tasks

        seeds, text_fields = _check_settings(args)
        hf_dir, run_dir = plan_model(args.model, args.output)
        tasks = load_tasks(args.task, text_fields, args.label_field, args.regression)
        _quiet_transformers()
        exported = run_dir is None or os.path.isfile(os.path.join(hf_dir, "config.json"))
        if exported:  # else these checks wait for the export
            settings, tokenizer = _resolve_settings(args, hf_dir), _load_tokenizer(hf_dir)
        os.makedirs(args.output, exist_ok=True)
        prepare_model(hf_dir, run_dir)  # exports a RUN_DIR (once per OUT)
        if not exported:
            settings, tokenizer = _resolve_settings(args, hf_dir), _load_tokenizer(hf_dir)
    except FinetuneError as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2

    results = {
        "format_version": FORMAT_VERSION,
        "model": os.path.abspath(hf_dir),
        "exported_from": os.path.abspath(run_dir) if run_dir else None,
        "settings": {**settings.to_dict(), "seeds": seeds},
        "tasks": {},
        "command": shlex.join([sys.executable, "-m", "finetune", *(argv or sys.argv[1:])]),
        "versions": _versions(),
    }
    t0 = time.time()
    for task in tasks:
        sizes = ", ".join(f"{s.name} {len(s):,}" for s in (task.train, *(s for _, s in task.evals)))
        print(f"finetune: {task.name} ({task.layout}): {sizes}", file=sys.stderr)
        entry = run_task(task, hf_dir, tokenizer, settings, seeds, args.baselines, args.output)
        results["tasks"][task.name] = entry
        _write_json(os.path.join(args.output, RESULTS), results)
    print(format_table(results))
    print(
        f"finetune: {len(tasks)} task(s) x {len(seeds)} seed(s) in {time.time() - t0:.0f} s; "
        f"{os.path.join(args.output, RESULTS)}",
        file=sys.stderr,
    )
    return 0


def _resolve_settings(args, hf_dir: str) -> Settings:
    from finetune.models import check_hf_dir
    from finetune.train import default_lr, default_max_seq_len, resolve_device

    config = check_hf_dir(hf_dir)
    limit = config.get("max_position_embeddings", 512)
    if args.max_seq_len is not None and args.max_seq_len > limit:
        raise FinetuneError(
            f"--max-seq-len {args.max_seq_len}: the model has {limit} positions "
            "(max_position_embeddings)"
        )
    return Settings(
        epochs=args.epochs,
        lr=args.lr if args.lr is not None else default_lr(config),
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len or default_max_seq_len(config),
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        device=resolve_device(args.device),
    )


def _versions() -> dict:
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
