"""Does token dropping keep quality at lower cost? Dense against each strategy, end to end.

    python benchmarks/bench_quality.py [--output DIR] [--steps 700] [--seeds 1,2,3]
        [--model JSON|PRESET] [--strategies none,loss_ema,frequency,random]
        [--final-phase 10%] [--task builtin:topic] [--finetune-seeds 1] ...

The default (6 layers, hidden 128, sequences of 128, batches of 32, one rank) takes about
an hour on 2 CPU cores.

What it does, as a user would (every stage is the project's own command, in a subprocess):

1. ``python -m data_prep`` once on ``--corpus`` (default the built-in corpus).
2. For each seed, ``deepspeed --num_gpus RANKS pretrain/run.py`` for every strategy
   (``none`` is dense), with the same seed, so the same data order, masking and initial
   weights; ``loss_ema+final`` is ``loss_ema`` that ends with ``--final-phase`` of the steps
   without dropping (the paper's optional last phase), to measure what that phase does.
   The paper's recipe: keep ratio 0.5, the default layer split (the first half of the layers
   and the last see every token), loss-EMA beta 0.995.
3. ``python -m finetune --model RUN_DIR --task TASK`` on each run (exports it first).
4. ``python -m pretrain.report`` over the first seed's runs, with their fine-tuning scores.

It answers, side by side from one run of the bench (``DIR/results.json``, ``DIR/results.md``,
the table printed at the end):

- at equal steps: each variant's final full-sequence validation MLM loss and downstream
  score against dense (mean and standard deviation over the seeds);
- what each variant saved: training seconds (the trainer's own step times, so evaluation
  and checkpoints are left out) and training FLOPs (the project's FLOPs model), as a share
  of dense's;
- at equal wall-clock and at equal FLOPs: the variant's validation loss at the end of its
  run against dense's validation curve at the same seconds (FLOPs), linearly interpolated
  between dense's evaluations. Dense has not finished its schedule there (its learning
  rate is higher than at its own end), which flatters neither side exactly: read it as the
  question "stopped at the same cost, which is ahead".

Runs already finished in ``DIR`` are reused (a bench that was stopped goes on); delete
``DIR`` to start afresh. Timings are only comparable when nothing else loads the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_model import machine_description  # noqa: E402

from pretrain.report import Run, load_run  # noqa: E402

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}
DENSE = "none"
FINAL = "loss_ema+final"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", default="runs/bench_quality", help="everything goes here")
    p.add_argument("--corpus", default="builtin:python-docstrings", help="data_prep --input")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument(
        "--model",
        default='{"num_layers": 6, "hidden_size": 128, "num_heads": 2, "intermediate_size": 512}',
        help="a preset name, a JSON file, or inline JSON of the model's fields",
    )
    p.add_argument("--steps", type=int, default=700, help="pretraining steps of every run")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak pretraining learning rate")
    p.add_argument("--warmup", type=int, default=70, help="warmup steps, then linear decay")
    p.add_argument(
        "--ranks", type=int, default=1, help="data-parallel ranks (2 cores: 1 rank is fastest)"
    )
    p.add_argument("--seeds", default="1,2,3", help="pretraining seeds")
    p.add_argument("--strategies", default="none,loss_ema,frequency,random")
    p.add_argument("--keep-ratio", type=float, default=0.5)
    p.add_argument(
        "--final-phase",
        default="10%",
        help=f"the last steps without dropping of the {FINAL!r} variant; 0: no such variant",
    )
    p.add_argument("--evals", type=int, default=12, help="validations per run")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--task", default="builtin:topic", help="python -m finetune --task")
    p.add_argument("--finetune-seeds", default="1")
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--finetune-epochs", type=float, default=3.0)
    return p.parse_args(argv)


def run(command: list[str], log: Path, env: dict | None = None) -> float:
    """Run ``command`` from the repository root, its output to ``log``; seconds taken."""
    started = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        tail = log.read_text()[-2000:]
        sys.exit(f"bench_quality: {' '.join(command[:4])} ... failed (see {log}):\n{tail}")
    return time.perf_counter() - started


def model_file(spec: str, root: Path) -> str:
    """--model for run.py: a preset name or a JSON file as given; inline JSON written out."""
    if not spec.lstrip().startswith("{"):
        return spec
    path = root / "model.json"
    path.write_text(json.dumps(json.loads(spec), indent=2))
    return str(path)


def deepspeed_config(args: argparse.Namespace, root: Path) -> str:
    with open(REPO / "ds_configs" / "cpu_zero0.json") as f:
        ds = json.load(f)
    if args.batch_size % args.ranks:
        sys.exit(f"bench_quality: --batch-size {args.batch_size} is not a multiple of --ranks")
    ds["train_batch_size"] = args.batch_size
    ds["train_micro_batch_size_per_gpu"] = args.batch_size // args.ranks
    ds["scheduler"]["params"].update(warmup_max_lr=args.lr, warmup_num_steps=args.warmup)
    path = root / "ds_config.json"
    path.write_text(json.dumps(ds, indent=2))
    return str(path)


def variants(args: argparse.Namespace) -> list[str]:
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if DENSE not in names:
        sys.exit(f"bench_quality: --strategies must include {DENSE!r} (the dense reference)")
    if args.final_phase.strip() not in ("0", "0%") and "loss_ema" in names:
        names.append(FINAL)
    return names


def finished(run_dir: Path, steps: int) -> bool:
    latest = run_dir / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text().strip() == f"global_step{steps:06d}"


def pretrain(args, variant: str, seed: int, data: Path, ds: str, model: str, root: Path) -> Path:
    out = root / "runs" / f"{variant}-s{seed}"
    if finished(out, args.steps):
        return out
    shutil.rmtree(out, ignore_errors=True)
    strategy = "loss_ema" if variant == FINAL else variant
    every = max(1, args.steps // args.evals)
    command = ["deepspeed", "--num_gpus", str(args.ranks), "pretrain/run.py"]
    command += ["--deepspeed_config", ds, "--data", str(data), "--output", str(out)]
    command += ["--model", model, "--train-steps", str(args.steps), "--seed", str(seed)]
    command += ["--token-drop", strategy, "--keep-ratio", str(args.keep_ratio)]
    command += ["--eval-every", str(every), "--eval-batches", str(args.eval_batches)]
    command += ["--save-every", "0"]
    if variant == FINAL:
        command += ["--full-seq-final", args.final_phase]
    print(f"bench_quality: pretraining {out.name}", file=sys.stderr, flush=True)
    run(command, root / "logs" / f"pretrain-{out.name}.log")
    return out


def finetune_dir(model_dir: Path, root: Path) -> Path:
    """Where the fine-tuning of a model under ``root`` goes (``runs/none-s1``: runs_none-s1)."""
    return root / "finetune" / model_dir.relative_to(root).as_posix().replace("/", "_")


def finetune(args, run_dir: Path, root: Path) -> dict:
    """The task's first metric (mean over the fine-tuning seeds), from results.json."""
    out = finetune_dir(run_dir, root)
    results = out / "results.json"
    if not results.is_file():
        print(f"bench_quality: fine-tuning {out.name}", file=sys.stderr, flush=True)
        command = [sys.executable, "-m", "finetune", "--model", str(run_dir)]
        command += ["--task", args.task, "--output", str(out), "--seeds", args.finetune_seeds]
        command += ["--lr", str(args.finetune_lr), "--epochs", str(args.finetune_epochs)]
        run(command, root / "logs" / f"finetune-{out.name}.log", env=OFFLINE)
    with open(results) as f:
        tasks = json.load(f)["tasks"]
    (name, entry), *_ = tasks.items()
    metric = entry["metric_names"][0]
    return {
        "task": name,
        "metric": metric,
        "mean": entry["metrics"][metric]["mean"],
        "baselines": {k: v[metric] for k, v in entry.get("baselines", {}).items()},
        "results": str(results),
    }


def random_init(dense_run: Path, seed: int, root: Path) -> Path:
    """The dense run's exported network with random weights (seeded), its tokenizer: what
    fine-tuning reaches without any pretraining."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    export = finetune_dir(dense_run, root) / "exported_model"
    out = root / "random_init" / f"s{seed}"
    if not (out / "model.safetensors").is_file():
        torch.manual_seed(seed)
        BertForMaskedLM(BertConfig.from_pretrained(export)).save_pretrained(out)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(export / name, out / name)
    return out


def final_validation(r: Run) -> float:
    if not r.evals or r.evals[-1]["step"] != r.steps_done:
        sys.exit(f"bench_quality: {r.run_dir} has no validation at its last step")
    return r.evals[-1]["val_loss"]


def validation_at(dense: Run, cost: str, value: float) -> float | None:
    """Dense's validation loss at ``value`` seconds or FLOPs (``cost``), interpolated between
    its evaluations; None beyond its last one."""
    cumulative = dense.seconds if cost == "seconds" else dense.flops
    steps = np.array([e["step"] for e in dense.evals], dtype=float)
    at = dense.at_steps(cumulative, steps)
    if value > at[-1]:
        return None
    losses = [e["val_loss"] for e in dense.evals]
    return float(np.interp(value, at, losses))


def mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "per_seed": values,
    }


def compare(names: list[str], runs: dict, downstream: dict) -> dict:
    """Per variant: the figures over seeds, and against dense of the same seed."""
    out = {}
    for name in names:
        rows = []
        for seed, by_variant in runs.items():
            r, d = by_variant[name], by_variant[DENSE]
            val, dense_val = final_validation(r), final_validation(d)
            seconds, flops = float(r.seconds[-1]), float(r.flops[-1])
            at_time = validation_at(d, "seconds", seconds)
            at_flops = validation_at(d, "flops", flops)
            rows.append(
                {
                    "val_loss": val,
                    "val_vs_dense": val / dense_val - 1,
                    "downstream": downstream[seed][name]["mean"],
                    "downstream_vs_dense": downstream[seed][name]["mean"]
                    - downstream[seed][DENSE]["mean"],
                    "seconds": seconds,
                    "seconds_saved": 1 - seconds / float(d.seconds[-1]),
                    "flops": flops,
                    "flops_saved": 1 - flops / float(d.flops[-1]),
                    "dense_val_at_equal_seconds": at_time,
                    "dense_val_at_equal_flops": at_flops,
                }
            )
        at_equal = [f"dense_val_at_equal_{cost}" for cost in ("seconds", "flops")]
        out[name] = {k: mean_std([row[k] for row in rows]) for k in rows[0] if k not in at_equal}
        for key in at_equal:
            values = [row[key] for row in rows]
            out[name][key] = None if None in values else mean_std(values)
            # per seed: is the variant's loss below dense's at the same cost
            ahead = [row["val_loss"] < row[key] for row in rows if row[key] is not None]
            out[name][key.replace("dense_val", "ahead")] = ahead or None
    return out


def _pm(stats: dict | None, scale: float = 1.0, fmt: str = ".3f", sign: bool = False) -> str:
    if stats is None:
        return "-"
    text = f"{scale * stats['mean']:{'+' if sign else ''}{fmt}}"
    if stats["std"] is not None:
        text += f" ± {scale * stats['std']:{fmt}}"
    return text


def _seeds(flags: list[bool] | None) -> str:
    return "-" if flags is None else f"{sum(flags)}/{len(flags)} seeds"


def table(comparison: dict, metric: str) -> list[list[str]]:
    head = [
        "variant",
        "val loss",
        "vs dense",
        f"downstream {metric} x100",
        "vs dense (points)",
        "time saved",
        "FLOPs saved",
        "dense val at equal time",
        "ahead at equal time",
        "dense val at equal FLOPs",
        "ahead at equal FLOPs",
    ]
    rows = [head]
    for name, c in comparison.items():
        if name == DENSE:
            rows.append([name, _pm(c["val_loss"]), "reference", _pm(c["downstream"], 100, ".1f")])
            rows[-1] += ["reference"] * (len(head) - len(rows[-1]))
            continue
        rows.append(
            [
                name,
                _pm(c["val_loss"]),
                _pm(c["val_vs_dense"], 100, ".2f", True) + "%",
                _pm(c["downstream"], 100, ".1f"),
                _pm(c["downstream_vs_dense"], 100, ".1f", True),
                _pm(c["seconds_saved"], 100, ".1f") + "%",
                _pm(c["flops_saved"], 100, ".1f") + "%",
                _pm(c["dense_val_at_equal_seconds"]),
                _seeds(c["ahead_at_equal_seconds"]),
                _pm(c["dense_val_at_equal_flops"]),
                _seeds(c["ahead_at_equal_flops"]),
            ]
        )
    return rows


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.output).resolve()
    (root / "logs").mkdir(parents=True, exist_ok=True)
    names = variants(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.time()

    data = root / "data"
    if not (data / "manifest.json").is_file():
        print("bench_quality: preparing the data", file=sys.stderr, flush=True)
        command = [sys.executable, "-m", "data_prep", "--input", args.corpus]
        command += ["--output", str(data), "--seq-len", str(args.seq_len)]
        command += ["--vocab-size", str(args.vocab_size)]
        run(command, root / "logs" / "data_prep.log")
    ds = deepspeed_config(args, root)
    model = model_file(args.model, root)

    runs: dict[int, dict[str, Run]] = {}
    downstream: dict[int, dict[str, dict]] = {}
    for seed in seeds:
        runs[seed], downstream[seed] = {}, {}
        for name in names:
            run_dir = pretrain(args, name, seed, data, ds, model, root)
            runs[seed][name] = load_run(str(run_dir), name)
            downstream[seed][name] = finetune(args, run_dir, root)
        unpretrained = random_init(root / "runs" / f"{DENSE}-s{seed}", seed, root)
        downstream[seed]["random_init"] = finetune(args, unpretrained, root)

    first = seeds[0]
    command = [sys.executable, "-m", "pretrain.report"]
    command += [r.run_dir for r in runs[first].values()]
    command += ["--output", str(root / "report")]
    for name in names:
        command += ["--label", name]
    for name in names:
        command += [
            "--finetune",
            f"{runs[first][name].run_dir}={downstream[first][name]['results']}",
        ]
    run(command, root / "logs" / "report.log")

    comparison = compare(names, runs, downstream)
    any_seed = downstream[first][DENSE]
    rows = table(comparison, any_seed["metric"])
    no_pretraining = mean_std([downstream[seed]["random_init"]["mean"] for seed in seeds])
    results = {
        "settings": vars(args),
        "variants": names,
        "machine": machine_description(),
        "task": any_seed["task"],
        "metric": any_seed["metric"],
        "baselines": any_seed["baselines"],
        "comparison": comparison,
        "downstream_without_pretraining": no_pretraining,
        "bench_seconds": time.time() - started,
        "command": " ".join([sys.executable, *sys.argv]),
    }
    (root / "results.json").write_text(json.dumps(results, indent=2))
    baselines = ", ".join(f"{k} {100 * v:.1f}" for k, v in any_seed["baselines"].items())
    text = (
        f"Task {any_seed['task']} ({any_seed['metric']}; baselines: {baselines}); "
        f"{len(seeds)} pretraining seed(s) x {len(args.finetune_seeds.split(','))} "
        f"fine-tuning seed(s); {args.steps} steps each. Without pretraining (the same "
        f"network, random weights): {_pm(no_pretraining, 100, '.1f')}.\n\n" + markdown(rows)
    )
    (root / "results.md").write_text(text)
    print(text)
    print(f"bench_quality: {root}/results.json, report {root}/report/index.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
