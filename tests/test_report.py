"""python -m pretrain.report on real runs: plots that are PNGs, index.md, the summary on
stdout, the importance table decoded, runs in progress, fine-tuning scores, one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_train import at_once, deepspeed, metrics, train_args

from pretrain.report import cumulative_cost, default_labels, main, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Two 10-step runs, evaluated and checkpointed at steps 5 and 10: one with the loss_ema
    table, one dense."""
    root = tmp_path_factory.mktemp("report")
    out = {}
    launches = []
    for name, strategy in (("drop", "loss_ema"), ("dense", "none")):
        run = root / name
        extra = ("--eval-every", 5, "--save-every", 5, "--token-drop", strategy)
        launches.append(
            lambda run=run, extra=extra: deepspeed(
                train_args(data_dir, run, "cpu_zero0.json", 10, *extra)
            )
        )
        out[name] = run
    at_once(*launches)  # the two runs do not depend on each other
    return out


def report(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pretrain.report: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def check_plots(out) -> list[str]:
    """Every PNG of a report is a readable image, and index.md shows exactly those."""
    from PIL import Image

    plots = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
    for name in plots:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.width > 400 and image.height > 300, name
    index = (out / "index.md").read_text()
    assert sorted(re.findall(r"!\[[^]]*\]\(([^)]+)\)", index)) == plots
    return plots


def summary_row(text: str, label: str) -> list[str]:
    """The cells of ``label``'s row in index.md's summary table."""
    summary = text.split("## Summary")[1].split("##")[0]
    rows = [line.strip("|").split(" | ") for line in summary.splitlines() if line.startswith("|")]
    return next([c.strip() for c in r] for r in rows if r[0].strip() == label)


@pytest.mark.slow
def test_one_run_and_two_runs_write_every_plot_and_the_summary(runs, tmp_path, capsys):
    code, out, err = report(capsys, runs["drop"], "--output", tmp_path / "one")
    assert code == 0, err
    assert out.splitlines()[2].startswith("drop  loss_ema (K=32/64)  10/10")
    assert check_plots(tmp_path / "one") == ["importance-1-drop.png", "loss.png", "training.png"]

    code, out, err = report(capsys, runs["drop"], runs["dense"], "--output", tmp_path / "two")
    assert code == 0, err
    assert check_plots(tmp_path / "two") == ["importance-1-drop.png", "loss.png", "training.png"]
    index = (tmp_path / "two" / "index.md").read_text()
    drop, dense = summary_row(index, "drop"), summary_row(index, "dense")
    assert drop[1:3] == ["loss_ema (K=32/64)", "10/10"] and dense[1:3] == ["none", "10/10"]
    records = metrics(runs["dense"])
    final = [r for r in records if "val_loss" in r][-1]
    assert dense[3] == f"{final['val_loss']:.4f} (10)"
    assert dense[4] == f"{sum(r['step_s'] for r in records if 'loss' in r):,.1f}"
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["run", "strategy"]
    assert [line.split()[0] for line in lines[2:]] == ["drop", "dense"]


@pytest.mark.slow
def test_the_importance_table_is_decoded_for_loss_ema_and_absent_without_dropping(
    runs, tmp_path, capsys
):
    """The lowest and highest scores of the last checkpoint's table, as the run saved it,
    appear with their pieces and counts; the rank correlation is scipy's of the two tables."""
    import sentencepiece
    from scipy.stats import spearmanr

    from data_prep.manifest import load_manifest

    code, _, err = report(capsys, runs["drop"], runs["dense"], "--output", tmp_path / "r")
    assert code == 0, err
    index = (tmp_path / "r" / "index.md").read_text()
    assert "## Importance table: drop" in index and "Importance table: dense" not in index

    tables = [
        torch.load(
            runs["drop"] / "checkpoints" / f"global_step{s:06d}" / "mp_rank_00_model_states.pt",
            weights_only=False,
        )["importance"]["table"].numpy()
        for s in (5, 10)
    ]
    config = json.loads((runs["drop"] / "config.json").read_text())
    manifest = load_manifest(config["data"]["dir"])
    counts = manifest.token_counts()
    shown = np.flatnonzero(counts > 0)
    shown = shown[~np.isin(shown, manifest.special.all)]
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=manifest.tokenizer_path)
    lowest = shown[np.argmin(tables[1][shown])]
    dropped = index.split("### Dropped most")[1].split("###")[0]
    row = next(line for line in dropped.splitlines() if line.startswith("| 1 |"))
    piece = tokenizer.id_to_piece(int(lowest))
    assert row == f"| 1 | {lowest} | `{piece}` | {counts[lowest]:,} | {tables[1][lowest]:.4f} |"
    kept = index.split("### Kept most")[1]
    assert f"{tables[1][shown].max():.4f} |" in kept.splitlines()[4]
    rho = spearmanr(tables[0][shown], tables[1][shown]).statistic
    assert f"steps 5 and 10: {rho:.4f}." in index
    assert f"the {len(shown):,} ids that occur in the train data" in index


@pytest.mark.slow
def test_a_run_in_progress_is_reported_as_far_as_it_got(runs, tmp_path, capsys):
    """A copy of the run cut in the middle of its 8th record, without checkpoints."""
    run = tmp_path / "partial"
    shutil.copytree(runs["drop"], run, ignore=shutil.ignore_patterns("checkpoints"))
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    step_lines = [i for i, line in enumerate(lines) if '"loss"' in line]
    cut = step_lines[7]
    (run / "metrics.jsonl").write_text("".join(lines[:cut]) + lines[cut][: len(lines[cut]) // 2])

    code, _, err = report(capsys, run, runs["dense"], "--output", tmp_path / "r")
    assert code == 0, err
    index = (tmp_path / "r" / "index.md").read_text()
    first_val = [r for r in metrics(runs["drop"]) if "val_loss" in r][0]
    assert summary_row(index, "partial")[2:4] == ["7/10", f"{first_val['val_loss']:.4f} (5)"]
    assert "## Importance table: partial\n\nNo complete checkpoint yet." in index
    check_plots(tmp_path / "r")


@pytest.mark.slow
def test_a_run_whose_data_is_gone_shows_its_table_without_pieces(runs, tmp_path, capsys):
    run = tmp_path / "moved"
    shutil.copytree(runs["drop"], run)
    config = json.loads((run / "config.json").read_text())
    config["data"]["dir"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(config))
    code, _, err = report(capsys, run, "--output", tmp_path / "r")
    assert code == 0, err
    section = (tmp_path / "r" / "index.md").read_text().split("## Importance table: moved")[1]
    assert f"all {config['model']['vocab_size']} ids: pieces and counts are not shown" in section
    assert "gone: no such data directory" in section
    assert "| # | id | score |" in section
    check_plots(tmp_path / "r")


def results_json(path, exported_from, mean=0.44, std=0.01):
    results = {
        "format_version": 1,
        "model": str(path.parent / "hf"),
        "exported_from": exported_from,
        "tasks": {
            "topic": {
                "metric_names": ["accuracy"],
                "metrics": {"accuracy": {"mean": mean, "std": std, "per_seed": {"1": mean}}},
                "baselines": {"majority": {"accuracy": 0.25}},
            }
        },
    }
    path.write_text(json.dumps(results))
    return path


@pytest.mark.slow
def test_finetune_scores_join_the_run_they_came_from(runs, tmp_path, capsys):
    drop = results_json(tmp_path / "drop.json", os.path.abspath(runs["drop"]))
    dense = results_json(tmp_path / "dense.json", None, mean=0.5, std=None)
    code, out, err = report(
        capsys,
        *(runs["drop"], runs["dense"], "--output", tmp_path / "r", "--finetune", drop),
        *("--finetune", f"{runs['dense']}={dense}", "--label", "A", "--label", "B"),
    )
    assert code == 0, err
    index = (tmp_path / "r" / "index.md").read_text()
    assert "topic accuracy (x100) |" in index.split("## Summary")[1].splitlines()[2]
    assert summary_row(index, "A")[-1] == "44.0 ± 1.0" and summary_row(index, "B")[-1] == "50.0"
    assert "44.0 ± 1.0" in out

    other = results_json(tmp_path / "other.json", str(tmp_path / "elsewhere"))
    code, _, err = report(capsys, runs["drop"], "--output", tmp_path / "r2", "--finetune", other)
    one_line_error(code, err, "other.json", "none of the runs")
    code, _, err = report(capsys, runs["drop"], "--output", tmp_path / "r2", "--finetune", dense)
    one_line_error(code, err, "RUN_DIR=RESULTS_JSON")
    assert not (tmp_path / "r2").exists()


@pytest.mark.slow
def test_an_existing_report_is_replaced_and_other_directories_are_refused(runs, tmp_path, capsys):
    out = tmp_path / "r"
    assert report(capsys, runs["dense"], "--output", out)[0] == 0
    (out / "stale.txt").write_text("from before")
    assert report(capsys, runs["dense"], "--output", out)[0] == 0
    assert not (out / "stale.txt").exists() and (out / "loss.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temporary directory left

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = report(capsys, runs["dense"], "--output", tmp_path / "mine")
    one_line_error(code, err, "not a report")
    code, _, err = report(capsys, runs["dense"], "--output", runs["dense"].parent)
    one_line_error(code, err, "would replace")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_directory_without_metrics_is_a_one_line_error(tmp_path):
    (tmp_path / "empty_run").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "pretrain.report", str(tmp_path / "empty_run")]
        + ["--output", str(tmp_path / "report")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    one_line_error(result.returncode, result.stderr, str(tmp_path / "empty_run"), "metrics.jsonl")
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty_run"]


def test_metrics_tolerate_a_record_cut_by_a_kill_but_not_a_broken_line(tmp_path):
    from pretrain.report import ReportError

    record = {"step": 1, "loss": 5.0, "lr": 1e-4, "tokens_per_s": 10.0, "kept_fraction": 0.5}
    record |= {"kept_masked_fraction": 0.9, "step_s": 0.1}
    good = json.dumps(record) + "\n" + json.dumps({"step": 1, "val_loss": 4.0, "val_acc": 0.1})
    (tmp_path / "cut.jsonl").write_text(good + "\n" + json.dumps({**record, "step": 2})[:40])
    steps, evals = read_metrics(str(tmp_path / "cut.jsonl"))
    assert [r["step"] for r in steps] == [1] and evals[0]["val_loss"] == 4.0
    (tmp_path / "broken.jsonl").write_text('{"step": 1, "lo\n' + good + "\n")
    with pytest.raises(ReportError, match="broken.jsonl:1: not a JSON record"):
        read_metrics(str(tmp_path / "broken.jsonl"))


def test_a_logged_step_stands_for_the_steps_since_the_previous_log():
    """With --log-every 5, each record's time and FLOPs count five times; the dense phase
    at the end costs more per step than the dropped one."""
    from pretrain.flops import train_step_flops
    from pretrain.model import ModelConfig

    model = ModelConfig.from_preset("tiny", vocab_size=200)
    config = {
        "model": dataclasses.asdict(model),
        "deepspeed": {"train_batch_size": 16},
        "data": {"seq_len": 64},
    }
    steps = [
        {"step": 5, "step_s": 0.5, "kept_fraction": 0.5},
        {"step": 10, "step_s": 0.25, "kept_fraction": 0.5},
        {"step": 12, "step_s": 1.0, "kept_fraction": 1.0},
    ]
    seconds, flops = cumulative_cost(config, steps)
    dropped, dense = (train_step_flops(model, 16, 64, keep_ratio=k) for k in (0.5, 1.0))
    assert seconds.tolist() == [2.5, 3.75, 5.75]
    assert flops.tolist() == pytest.approx([5 * dropped, 10 * dropped, 10 * dropped + 2 * dense])
    assert dense > dropped


def test_default_labels_are_the_directory_names_with_parents_where_they_repeat(tmp_path):
    assert default_labels([str(tmp_path / "a"), str(tmp_path / "b")]) == ["a", "b"]
    assert default_labels([str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")]) == [
        "x/run",
        "y/run",
    ]
