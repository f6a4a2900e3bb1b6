"""``python -m pretrain.report RUN_DIR ... --output REPORT_DIR``: plots and a summary of runs.

    python -m pretrain.report RUN_DIR [RUN_DIR ...] --output REPORT_DIR
        [--finetune [RUN_DIR=]RESULTS_JSON ...] [--label NAME ...]

Reads what pretrain/run.py leaves in each RUN_DIR (``config.json``, ``metrics.jsonl``, the
checkpoints' importance tables) and writes, one colour per run:

    loss.png           train loss (raw, faint, and a trailing mean over 2% of the run's
                       logged steps) and full-sequence validation loss against steps,
                       training time and training FLOPs
    training.png       learning rate, tokens/s, kept fraction and the kept share of the
                       predicted positions against steps
    importance-N-*.png for a run with an importance table (loss_ema, frequency): the
                       distribution of its scores over the ids of the train data and, with
                       two checkpoints or more, the first checkpoint's scores against the last's
    index.md           the plots, the summary table, the most dropped and most kept pieces
                       (decoded with the data's tokenizer, with their counts) and
                       the Spearman rank correlation of first and last table

and prints the summary table (strategy, steps, final validation loss, training time, FLOPs,
downstream scores from ``--finetune`` results) on stdout.

Training time is the sum of the logged ``step_s`` (evaluation and checkpointing excluded);
with ``--log-every`` n > 1, a logged step stands for the n steps since the previous one.
Training FLOPs are pretrain.flops' matmul model of each step at its logged kept fraction.
A run in progress is reported as far as it got. A ``--finetune`` results.json belongs to
the run it was exported from (its ``exported_from``), or to the run named as
``RUN_DIR=RESULTS_JSON``.

The report appears whole or not at all: it is written into a temporary sibling directory
and renamed over REPORT_DIR when complete; an existing report there is replaced.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shlex
import shutil
import sys
import warnings
from dataclasses import dataclass

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from data_prep.atomic import TMP_MARK, replace_directory  # noqa: E402
from data_prep.errors import DataPrepError  # noqa: E402
from data_prep.manifest import load_manifest  # noqa: E402
from data_prep.tokenizer import open_tokenizer  # noqa: E402
from pretrain import checkpoint  # noqa: E402
from pretrain.checkpoint import CheckpointRef  # noqa: E402
from pretrain.flops import train_step_flops  # noqa: E402
from pretrain.importance import STRATEGIES  # noqa: E402
from pretrain.model import ModelConfig  # noqa: E402

INDEX = "index.md"
RUN_STATE = "run_state.json"
LOSS_PLOT = "loss.png"
TRAINING_PLOT = "training.png"
STEP_FIELDS = ("step", "loss", "lr", "tokens_per_s", "kept_fraction", "kept_masked_fraction")
SMOOTHING = 0.02  # trailing-mean window, as a share of a run's logged steps
TOP_PIECES = 15  # rows of the most dropped / most kept tables


class ReportError(Exception):
    """What stops a report: printed as one line, exit code 2."""


# -- one run ---------------------------------------------------------------------------------


@dataclass
class Run:
    """A run directory as far as it got: its step records as columns, its evaluations, and
    the cumulative training time and FLOPs at each logged step."""

    run_dir: str  # absolute
    label: str
    config: dict
    columns: dict[str, np.ndarray]  # STEP_FIELDS -> [logged steps]
    evals: list[dict]  # {"step", "val_loss", "val_acc"}
    seconds: np.ndarray  # [logged steps] training time up to and including each step
    flops: np.ndarray  # [logged steps] training FLOPs likewise

    @property
    def strategy(self) -> str:
        return self.config["run"]["token_drop"]

    @property
    def steps_done(self) -> int:
        return int(self.columns["step"][-1])

    def at_steps(self, cumulative: np.ndarray, steps) -> np.ndarray:
        """``cumulative`` (seconds or FLOPs) at arbitrary steps, interpolated between logs."""
        return np.interp(steps, np.r_[0, self.columns["step"]], np.r_[0.0, cumulative])


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(step records, evaluation records) of a metrics.jsonl. A last line without its
    newline is a record still being written and is left out."""
    steps, evals = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if not line.endswith("\n"):
                    break
                raise ReportError(f"{path}:{number}: not a JSON record") from None
            if "val_loss" in record:
                evals.append(record)
            elif "loss" in record:
                missing = [k for k in (*STEP_FIELDS, "step_s") if k not in record]
                if missing:
                    raise ReportError(f"{path}:{number}: step record without {missing[0]!r}")
                steps.append(record)
    return steps, evals


def cumulative_cost(config: dict, steps: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(training seconds, training FLOPs) up to each logged step. A record stands for the
    steps since the previous one (all of them, with ``--log-every`` 1)."""
    cfg = ModelConfig(**config["model"])
    batch, seq_len = config["deepspeed"]["train_batch_size"], config["data"]["seq_len"]
    per_step: dict[float, float] = {}  # kept fraction -> FLOPs of one step
    seconds, flops, previous = [], [], 0
    for record in steps:
        kept = record["kept_fraction"]
        if kept not in per_step:
            per_step[kept] = train_step_flops(cfg, batch, seq_len, keep_ratio=kept)
        covered = record["step"] - previous
        seconds.append(covered * record["step_s"])
        flops.append(covered * per_step[kept])
        previous = record["step"]
    return np.cumsum(seconds), np.cumsum(flops)


def load_run(run_dir: str, label: str) -> Run:
    """The run in ``run_dir``; raises ReportError when it has no config or no step record."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise ReportError(f"{run_dir}: no metrics.jsonl; not a RUN_DIR of pretrain/run.py")
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{run_dir}: cannot read its config.json ({e})") from None
    steps, evals = read_metrics(metrics)
    if not steps:
        raise ReportError(f"{metrics}: no step record yet")
    columns = {k: np.array([r[k] for r in steps], dtype=float) for k in STEP_FIELDS}
    seconds, flops = cumulative_cost(config, steps)
    return Run(os.path.abspath(run_dir), label, config, columns, evals, seconds, flops)


def default_labels(run_dirs: list[str]) -> list[str]:
    """Each run's directory name, with as many parent directories as tell them apart."""
    parts = [os.path.abspath(d).split(os.sep) for d in run_dirs]
    for depth in range(1, max(map(len, parts))):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [os.path.abspath(d) for d in run_dirs]


# -- importance tables -----------------------------------------------------------------------


@dataclass
class Importance:
    """A run's importance table at its first and last checkpoint, over the ids it is shown
    for: those of the train data (count > 0) that are not special, or every id when the
    run's data is gone."""

    strategy: str
    steps: list[int]  # the checkpoints read, first and last (one when there is one)
    tables: list[np.ndarray]  # [vocab] float32 each
    ids: np.ndarray  # [shown ids]
    counts: np.ndarray | None  # [vocab] counts in the train split
    pieces: list[str] | None  # [vocab] the data tokenizer's tokens
    data_note: str | None  # why counts and pieces are missing


def has_table(strategy: str) -> bool:
    """Whether the strategy's scores are a table worth showing (learned or from counts)."""
    kind = STRATEGIES[strategy]
    return kind.learns_from_loss or kind.needs_token_counts


def complete_checkpoints(run_dir: str) -> list[tuple[int, CheckpointRef]]:
    """(step, checkpoint) of the run's checkpoints whose rank-0 files are complete
    (``run_state.json`` is written after them), in step order."""
    return checkpoint.complete_checkpoints(os.path.join(run_dir, "checkpoints"), RUN_STATE)


def _importance_table(ref: CheckpointRef) -> np.ndarray:
    from pretrain.export import load_deepspeed_file, model_states_file

    path = os.path.join(ref.path, model_states_file(ref))
    try:
        client = load_deepspeed_file(path)
    except (OSError, RuntimeError, EOFError) as e:
        raise ReportError(f"{path}: cannot read the checkpoint ({e})") from None
    return client["importance"]["table"].float().numpy()


class DataUnavailable(Exception):
    """The run's DATA_DIR cannot say which pieces its ids are: the report goes on without."""


def vocabulary_of(run: Run) -> tuple[np.ndarray, list[str], tuple[int, ...]]:
    """(count of each id in the train split, each id's piece, the special ids) from the
    run's DATA_DIR; raises DataUnavailable when it is gone or holds other data."""
    data = run.config["data"]
    try:
        manifest = load_manifest(data["dir"])
        if manifest.sha256 != data["manifest_sha256"]:
            raise DataUnavailable(f"{data['dir']} no longer holds the data this run trained on")
        counts = manifest.token_counts()
        pieces = open_tokenizer(manifest.data_dir, manifest.raw["tokenizer"]).vocabulary()
    except (DataPrepError, OSError, RuntimeError) as e:
        raise DataUnavailable(f"the run's data is not readable ({e})") from None
    return counts, pieces, manifest.special.all


def load_importance(run: Run) -> Importance | None:
    """The importance table of a run whose strategy has one and which has a checkpoint."""
    checkpoints = complete_checkpoints(run.run_dir)
    if not has_table(run.strategy) or not checkpoints:
        return None
    chosen = [checkpoints[0], checkpoints[-1]] if len(checkpoints) > 1 else checkpoints
    tables = [_importance_table(ref) for _, ref in chosen]
    steps = [step for step, _ in chosen]
    vocab = len(tables[0])
    try:
        counts, pieces, special = vocabulary_of(run)
    except DataUnavailable as e:
        return Importance(run.strategy, steps, tables, np.arange(vocab), None, None, str(e))
    shown = counts > 0
    shown[list(special)] = False  # selection overrides their scores
    return Importance(run.strategy, steps, tables, np.flatnonzero(shown), counts, pieces, None)


def extremes(imp: Importance, lowest: bool, n: int = TOP_PIECES) -> np.ndarray:
    """The ``n`` shown ids of lowest (dropped most) or highest (kept most) final score;
    ties go to the more frequent id."""
    scores = imp.tables[-1][imp.ids]
    ties = -imp.counts[imp.ids] if imp.counts is not None else imp.ids
    order = np.lexsort((ties, scores if lowest else -scores))
    return imp.ids[order[:n]]


def initial_table(imp: Importance) -> np.ndarray | None:
    """The [vocab] table a strategy that learns from the loss starts from; None for others."""
    kind = STRATEGIES[imp.strategy]
    if not kind.learns_from_loss:
        return None
    return kind.initial_table(len(imp.tables[-1]), None).numpy()


def still_initial(imp: Importance) -> int | None:
    """How many shown ids still hold their initial score (never predicted yet), for a
    strategy that learns from the loss; None for the others."""
    initial = initial_table(imp)
    if initial is None:
        return None
    return int((imp.tables[-1][imp.ids] == initial[imp.ids]).sum())


def rank_correlation(imp: Importance) -> float:
    """Spearman's rho of the shown ids' scores at the first and the last checkpoint (NaN when
    either is constant)."""
    from scipy.stats import ConstantInputWarning, spearmanr

    first, last = (t[imp.ids] for t in (imp.tables[0], imp.tables[-1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        return float(spearmanr(first, last).statistic)


# -- fine-tuning results ---------------------------------------------------------------------


def read_finetune(values: list[str], runs: list[Run]) -> dict[str, dict[str, str]]:
    """{run dir: {"task metric": "mean ± std" (x100)}} from ``--finetune`` values, each
    RESULTS_JSON (matched by its ``exported_from``) or RUN_DIR=RESULTS_JSON."""
    by_path = {os.path.realpath(r.run_dir): r.run_dir for r in runs}
    scores: dict[str, dict[str, str]] = {}
    for value in values:
        named, results_path = None, value
        if not os.path.isfile(value) and "=" in value:
            named, _, results_path = value.partition("=")
        try:
            with open(results_path) as f:
                results = json.load(f)
            exported_from, task_scores = results.get("exported_from"), _task_scores(results)
        except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise ReportError(f"--finetune {value}: not a results.json of finetune ({e})") from None
        owner = named or exported_from
        if owner is None:
            raise ReportError(
                f"--finetune {value}: the model was not exported from a RUN_DIR; "
                "name its run: --finetune RUN_DIR=RESULTS_JSON"
            )
        run_dir = by_path.get(os.path.realpath(owner))
        if run_dir is None:
            raise ReportError(f"--finetune {value}: {owner} is none of the runs reported")
        twice = scores.setdefault(run_dir, {}).keys() & task_scores.keys()
        if twice:
            raise ReportError(f"--finetune: {min(twice)} of {run_dir} is given twice")
        scores[run_dir].update(task_scores)
    return scores


def _task_scores(results: dict) -> dict[str, str]:
    """{"task metric": "mean ± std" (x100)} of each task's first metric."""
    scores = {}
    for name, entry in results["tasks"].items():
        metric = (entry.get("metric_names") or list(entry["metrics"]))[0]
        summary = entry["metrics"][metric]
        mean, std = summary["mean"], summary["std"]
        scores[f"{name} {metric}"] = (
            "-"
            if mean is None
            else f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")
        )
    return scores


# -- the summary table -----------------------------------------------------------------------


def _strategy_text(run: Run) -> str:
    if not STRATEGIES[run.strategy].drops:
        return run.strategy
    return f"{run.strategy} (K={run.config['kept_tokens']}/{run.config['data']['seq_len']})"


def summary_rows(runs: list[Run], finetune: dict[str, dict[str, str]]) -> list[list[str]]:
    """Header and one row per run: label, strategy, steps, final validation loss, training
    time and FLOPs, downstream scores (x100)."""
    tasks = list(dict.fromkeys(t for scores in finetune.values() for t in scores))
    header = ["run", "strategy", "steps", "final val loss (step)", "training time (s)"]
    rows = [[*header, "training FLOPs", *(f"{t} (x100)" for t in tasks)]]
    for run in runs:
        last_eval = run.evals[-1] if run.evals else None
        rows.append(
            [
                run.label,
                _strategy_text(run),
                f"{run.steps_done}/{run.config['run']['train_steps']}",
                f"{last_eval['val_loss']:.4f} ({last_eval['step']})" if last_eval else "-",
                f"{run.seconds[-1]:,.1f}",
                f"{run.flops[-1]:.3g}",
                *(finetune.get(run.run_dir, {}).get(t, "-") for t in tasks),
            ]
        )
    return rows


def text_table(rows: list[list[str]]) -> str:
    """``rows`` aligned in columns for a terminal."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def markdown_table(rows: list[list[str]]) -> str:
    """``rows`` as a Markdown table, the first one the header."""
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join([lines[0], "|" + "---|" * len(rows[0]), *lines[1:]])


# -- plots -----------------------------------------------------------------------------------


def _figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.figure import Figure  # drawn by Agg on savefig: no display, no pyplot

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False).ravel()


def _colour(index: int) -> str:
    return f"C{index % 10}"


def _width(index: int, count: int) -> float:
    # earlier runs drawn wider, so that a later run on the same values leaves them visible
    return 1.2 + 1.2 * (count - 1 - index) / max(count - 1, 1)


def trailing_mean(values: np.ndarray) -> np.ndarray:
    """Each value averaged with those before it over a window of 2% of the series."""
    window = max(1, int(len(values) * SMOOTHING))
    sums = np.cumsum(np.r_[0.0, values])
    start = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (sums[1:] - sums[start]) / (np.arange(1, len(values) + 1) - start)


def _run_legend(fig, runs: list[Run]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=_colour(i), lw=2, label=r.label) for i, r in enumerate(runs)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5))


def plot_losses(runs: list[Run], path: str) -> None:
    """Train and validation loss against steps, training time and training FLOPs."""
    from matplotlib.lines import Line2D

    fig, axes = _figure(1, 3, 16, 5)
    losses = np.concatenate([r.columns["loss"] for r in runs] + [_val(r)[1] for r in runs])
    positive = losses[losses > 0]
    log_scale = len(positive) > 0 and positive.max() / positive.min() > 10
    for i, run in enumerate(runs):
        steps, loss = run.columns["step"], run.columns["loss"]
        val_steps, val_loss = _val(run)
        xs = [
            (steps, val_steps),
            (run.seconds, run.at_steps(run.seconds, val_steps)),
            (run.flops, run.at_steps(run.flops, val_steps)),
        ]
        for ax, (x, val_x) in zip(axes, xs):
            ax.plot(x, loss, color=_colour(i), lw=0.6, alpha=0.25)
            ax.plot(x, trailing_mean(loss), color=_colour(i), lw=_width(i, len(runs)))
            ax.plot(val_x, val_loss, color=_colour(i), ls="--", marker="o", ms=4)
    for ax, xlabel in zip(axes, ("step", "training time (s)", "training FLOPs")):
        ax.set(xlabel=xlabel, ylabel="loss (nats)", title=f"loss against {xlabel}")
        ax.set_yscale("log" if log_scale else "linear")
        ax.grid(alpha=0.3)
    styles = [
        Line2D([], [], color="black", lw=1.5, label="train (trailing mean)"),
        Line2D([], [], color="black", lw=0.6, alpha=0.4, label="train (raw)"),
        Line2D(
            [], [], color="black", ls="--", marker="o", ms=4, label="validation (full sequence)"
        ),
    ]
    axes[0].legend(handles=styles, loc="upper right")
    _run_legend(fig, runs)
    fig.savefig(path, dpi=100)


def _val(run: Run) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([e["step"] for e in run.evals], dtype=float),
        np.array([e["val_loss"] for e in run.evals], dtype=float),
    )


TRAINING_PANELS = (
    ("lr", "learning rate", False),
    ("tokens_per_s", "tokens/s", True),
    ("kept_fraction", "kept fraction (kept tokens / seq_len)", False),
    ("kept_masked_fraction", "kept share of the predicted positions", True),
)


def plot_training(runs: list[Run], path: str) -> None:
    """Learning rate, throughput, kept fraction and kept share of predictions by step; the
    noisy ones raw (faint) and as a trailing mean."""
    fig, axes = _figure(2, 2, 13, 8.5)
    for ax, (field, ylabel, noisy) in zip(axes, TRAINING_PANELS):
        for i, run in enumerate(runs):
            steps, values = run.columns["step"], run.columns[field]
            if noisy:
                ax.plot(steps, values, color=_colour(i), lw=0.6, alpha=0.25)
                values = trailing_mean(values)
            ax.plot(steps, values, color=_colour(i), lw=_width(i, len(runs)))
        ax.set(xlabel="step", ylabel=ylabel, title=ylabel)
        if "kept" in field:
            ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    _run_legend(fig, runs)
    fig.savefig(path, dpi=100)


def plot_importance(run: Run, colour: str, imp: Importance, path: str) -> None:
    """The final scores' histogram and, with two checkpoints, first against last."""
    fig, axes = _figure(1, len(imp.tables), 6.5 * len(imp.tables), 4.8)
    scores = [t[imp.ids] for t in imp.tables]
    which = "ids in the train data" if imp.counts is not None else "all ids"
    axes[0].hist(scores[-1], bins=50, color=colour, log=True)
    initial = initial_table(imp)
    if initial is not None and np.all(initial == initial[0]):
        axes[0].axvline(initial[0], color="grey", ls=":", label="initial score")
        axes[0].legend(loc="upper left")
    axes[0].set(
        xlabel=f"{imp.strategy} score at step {imp.steps[-1]}",
        ylabel=f"token ids ({which}, log scale)",
        title=f"{run.label}: importance scores of {len(imp.ids):,} ids",
    )
    if len(scores) > 1:
        ax = axes[1]
        ax.scatter(scores[0], scores[-1], s=6, alpha=0.4, color=colour)
        low, high = min(map(np.min, scores)), max(map(np.max, scores))
        ax.plot([low, high], [low, high], color="grey", ls="--", lw=1, label="unchanged")
        ax.set(
            xlabel=f"score at step {imp.steps[0]}",
            ylabel=f"score at step {imp.steps[-1]}",
            title=f"{run.label}: first vs last checkpoint, Spearman ρ {rank_correlation(imp):.3f}",
        )
        ax.legend(loc="upper left")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


# -- index.md --------------------------------------------------------------------------------


def _piece(text: str) -> str:
    """A piece as a Markdown code span (its own backticks fenced by longer runs)."""
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text[:1] == "`" or text[-1:] == "`" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def importance_section(run: Run, imp: Importance, plot: str) -> str:
    """index.md's section on one run's importance table."""
    lines = [f"## Importance table: {run.label}", ""]
    at = (
        f"the checkpoints at steps {imp.steps[0]} and {imp.steps[-1]}"
        if len(imp.steps) > 1
        else f"the checkpoint at step {imp.steps[0]}"
    )
    lines.append(
        f"The `{imp.strategy}` table of {at}, over "
        + (
            f"the {len(imp.ids):,} ids that occur in the train data (special ids left out: "
            "selection overrides their scores)."
            if imp.counts is not None
            else f"all {len(imp.ids):,} ids: pieces and counts are not shown, {imp.data_note}."
        )
    )
    initial = still_initial(imp)
    if initial is not None:
        lines.append(
            f"{initial:,} of them still hold the initial score (never a prediction target yet)."
        )
    if len(imp.tables) > 1:
        rho = rank_correlation(imp)
        shown = "undefined (a constant table)" if math.isnan(rho) else f"{rho:.4f}"
        lines.append(
            f"Spearman rank correlation of the scores at steps {imp.steps[0]} and "
            f"{imp.steps[-1]}: {shown}."
        )
    lines += ["", f"![importance scores of {run.label}]({plot})", ""]
    for lowest, title in ((True, "Dropped most (lowest scores)"), (False, "Kept most (highest)")):
        header = ["#", "id", *(["piece", "count"] if imp.counts is not None else []), "score"]
        rows = [header]
        for rank, i in enumerate(extremes(imp, lowest), 1):
            described = [_piece(imp.pieces[i]), f"{imp.counts[i]:,}"] if imp.pieces else []
            rows.append([str(rank), str(i), *described, f"{imp.tables[-1][i]:.4f}"])
        lines += [f"### {title}", "", markdown_table(rows), ""]
    return "\n".join(lines)


def index_text(
    runs: list[Run],
    summary: list[list[str]],
    sections: list[str],
    command: str,
) -> str:
    """The whole index.md."""
    listing = [["run", "directory", "strategy", "model", "global batch x seq_len"]]
    for run in runs:
        model, config = run.config["model"], run.config
        listing.append(
            [
                run.label,
                f"`{run.run_dir}`",
                _strategy_text(run),
                f"{model['num_layers']} layers, hidden {model['hidden_size']}",
                f"{config['deepspeed']['train_batch_size']} x {config['data']['seq_len']}",
            ]
        )
    return "\n".join(
        [
            "# Training report",
            "",
            f"`{command}`",
            "",
            markdown_table(listing),
            "",
            "## Summary",
            "",
            markdown_table(summary),
            "",
            "Training time: the sum of the logged step times (evaluation and checkpoints "
            "excluded). Training FLOPs: the matmul FLOPs of `pretrain.flops` at each step's "
            "kept fraction. Validation: the full sequence, no token dropping. Downstream "
            "scores: the first metric of each fine-tuning task, mean ± std over seeds, x100.",
            "",
            "## Loss",
            "",
            f"![loss against steps, training time and training FLOPs]({LOSS_PLOT})",
            "",
            "Train loss raw (faint) and as a trailing mean over 2% of each run's logged steps.",
            "",
            "## Training",
            "",
            f"![learning rate, tokens/s, kept fraction, kept share of predictions]({TRAINING_PLOT})",
            "",
            *sections,
        ]
    )


# -- the report directory --------------------------------------------------------------------


def check_output(out_dir: str, runs: list[Run]) -> None:
    """Refuse an output that would replace a run or a directory that is not a report."""
    real = os.path.realpath(out_dir)
    for run in runs:
        inside = os.path.realpath(run.run_dir)
        if inside == real or inside.startswith(real + os.sep):
            raise ReportError(f"--output {out_dir} would replace the run {run.run_dir}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ReportError(f"--output {out_dir} is a file")
    if (
        os.path.isdir(out_dir)
        and os.listdir(out_dir)
        and not os.path.isfile(os.path.join(out_dir, INDEX))
    ):
        raise ReportError(
            f"--output {out_dir} exists and is not a report (no {INDEX}); choose another"
        )


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_.") or "run"


def write_report(
    runs: list[Run], out_dir: str, finetune: dict[str, dict[str, str]], command: str
) -> list[list[str]]:
    """Write the report of ``runs`` into ``out_dir`` (replaced whole); returns the summary
    rows. Raises ReportError before anything is written."""
    check_output(out_dir, runs)
    importance = [load_importance(run) for run in runs]
    summary = summary_rows(runs, finetune)
    out_dir = os.path.abspath(out_dir.rstrip("/"))
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    for stale in glob.glob(f"{glob.escape(out_dir)}{TMP_MARK}*"):  # left by a killed report
        shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{out_dir}{TMP_MARK}{os.getpid()}"
    try:
        os.mkdir(tmp)
        plot_losses(runs, os.path.join(tmp, LOSS_PLOT))
        plot_training(runs, os.path.join(tmp, TRAINING_PLOT))
        sections = []
        for index, (run, imp) in enumerate(zip(runs, importance)):
            if imp is not None:
                plot = f"importance-{index + 1}-{_slug(run.label)}.png"
                plot_importance(run, _colour(index), imp, os.path.join(tmp, plot))
                sections.append(importance_section(run, imp, plot))
            elif has_table(run.strategy):
                sections.append(
                    f"## Importance table: {run.label}\n\nNo complete checkpoint yet.\n"
                )
        with open(os.path.join(tmp, INDEX), "w") as f:
            f.write(index_text(runs, summary, sections, command))
        replace_directory(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m pretrain.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="RUN_DIRs of pretrain/run.py")
    p.add_argument("--output", required=True, metavar="REPORT_DIR", help="directory to write")
    p.add_argument(
        "--finetune",
        action="append",
        default=[],
        metavar="[RUN_DIR=]RESULTS_JSON",
        help="a results.json of python -m finetune (repeatable)",
    )
    p.add_argument(
        "--label",
        action="append",
        metavar="NAME",
        help="the runs' names in legends and tables, one per RUN_DIR in order",
    )
    args = p.parse_args(argv)
    try:
        real = [os.path.realpath(d) for d in args.run_dirs]
        if len(set(real)) != len(real):
            raise ReportError("a RUN_DIR is given twice")
        if args.label is not None and len(args.label) != len(args.run_dirs):
            raise ReportError(
                f"{len(args.label)} --label values for {len(args.run_dirs)} RUN_DIRs; "
                "give one per RUN_DIR"
            )
        labels = args.label or default_labels(args.run_dirs)
        if len(set(labels)) != len(labels):
            raise ReportError(f"--label values repeat: {labels}")
        runs = [load_run(d, label) for d, label in zip(args.run_dirs, labels)]
        finetune = read_finetune(args.finetune, runs)
        command = shlex.join(["python", "-m", "pretrain.report", *argv])
        summary = write_report(runs, args.output, finetune, command)
    except ReportError as e:
        print(f"pretrain.report: error: {e}", file=sys.stderr)
        return 2
    print(text_table(summary))
    print(f"pretrain.report: wrote {os.path.abspath(args.output)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
