"""The run's own configuration, and the DeepSpeed JSON it is paired with.

Ownership (nothing is set in two places):

- the DeepSpeed JSON (``--deepspeed_config``) owns batch sizes, gradient accumulation,
  optimizer, LR schedule, precision, ZeRO stage and monitors;
- :class:`RunConfig` owns the model, the data, token dropping, the step count and the
  evaluation / checkpoint schedule.

Two DeepSpeed fields derive from the run and are filled in here when absent (and must
agree when present): the scheduler's ``total_num_steps`` (= ``--train-steps``) and the
TensorBoard ``output_path`` (= RUN_DIR). The resolved pair is written to
``RUN_DIR/config.json`` and into every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from data_prep.errors import DataPrepError
from data_prep.manifest import Manifest, load_manifest, verify_shards
from pretrain.distributed import launcher_world_size
from pretrain.importance import STRATEGIES
from pretrain.model import PRESETS, ModelConfig, num_kept_tokens

if TYPE_CHECKING:
    from pretrain.init_from import InitSource


class ConfigError(Exception):
    """A bad setting, found before any heavy work: printed as one line, exit code 2."""


@dataclass
class RunConfig:
    """Everything about a run that is not DeepSpeed's (see the module docstring)."""

    data: str  # DATA_DIR made by data_prep
    output: str  # RUN_DIR
    deepspeed_config: str
    model: str | None = None  # preset name or a JSON file of ModelConfig fields; None: bert-base
    init_from: str | None = None  # a checkpoint or Hugging Face BERT to start a new run from
    extend_positions: str | None = None  # copy | random: rows beyond SOURCE's positions
    train_steps: int = 1000  # optimizer steps of the whole schedule
    token_drop: str = "loss_ema"
    keep_ratio: float = 0.5
    dropout: float | None = None  # None: the model config's
    ema_beta: float = 0.995
    full_seq_final: str = "0"  # last steps without dropping: "N" steps or "P%" of train_steps
    pipeline_stages: int = 1
    resume: str | None = None  # None: fresh (refused if RUN_DIR has checkpoints); auto; PATH
    stop_at_step: int | None = None  # checkpoint and exit 0 here; the schedule stays train_steps
    seed: int = 1234
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 10  # validation micro-batches per data-parallel rank
    save_every: int = 500  # 0: only at the end (and on signals / --stop-at-step)
    keep_checkpoints: int = 0  # keep the newest N complete checkpoints; 0: all
    log_every: int = 1
    verify_data: bool = False  # also check every shard's sha256 against the manifest
    max_bad_steps: int = 3  # stop after N consecutive steps with a non-finite loss/grad norm
    collective_timeout: int = 1800  # seconds a collective waits for a peer before failing
    compile: str | None = None  # torch.compile backend (inductor); None: eager

    @property
    def full_seq_steps(self) -> int:
        value = self.full_seq_final.strip()
        if value.endswith("%"):
            return round(float(value[:-1]) / 100 * self.train_steps)
        return int(value)

    def to_dict(self) -> dict:
        return asdict(self)


_HELP = {
    "data": "DATA_DIR written by python -m data_prep",
    "output": "RUN_DIR: config.json, metrics.jsonl, checkpoints/, tensorboard/",
    "deepspeed_config": "DeepSpeed JSON (batch sizes, optimizer, schedule, precision, ZeRO)",
    "model": f"preset ({', '.join(PRESETS)}) or a JSON file of model config fields "
    "(default bert-base; with --init-from, SOURCE's model, which --model may only restate)",
    "init_from": "start a new run (step 0, new optimizer and schedule) from the weights of "
    "SOURCE: a run directory or checkpoint of this project, or a Hugging Face BERT directory "
    "(BertForMaskedLM or BertForPreTraining)",
    "extend_positions": "with --init-from, when the data's seq_len exceeds SOURCE's position "
    "embeddings: copy (new rows repeat the learned ones) or random (drawn as at initialisation)",
    "train_steps": "optimizer steps of the whole schedule",
    "token_drop": "importance strategy; none = the dense baseline",
    "keep_ratio": "fraction of positions the middle layers keep, in (0, 1]",
    "dropout": "hidden and attention dropout (default: the model config's, 0.1)",
    "ema_beta": "decay of the loss_ema importance table",
    "full_seq_final": "finish without dropping for the last N steps, or P%% of the run",
    "pipeline_stages": "pipeline-parallel stages (1: data parallel only)",
    "resume": "auto: continue from RUN_DIR/checkpoints/latest if any; PATH: that checkpoint",
    "stop_at_step": "checkpoint and exit 0 at this step (the schedule stays --train-steps)",
    "seed": "seeds the data order, masking, token selection and initialisation",
    "eval_every": "full-sequence validation every N steps (0: only at the end)",
    "eval_batches": "validation micro-batches per data-parallel rank",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "keep_checkpoints": "keep the newest N checkpoints, deleting older ones once a newer one "
    "is complete (0: keep all)",
    "log_every": "metrics.jsonl line every N steps",
    "verify_data": "also check each shard's sha256 against the manifest before training "
    "(every rank reads the data once; sizes and row counts are always checked)",
    "max_bad_steps": "stop with an error after N consecutive steps whose loss or gradient "
    "norm is not finite (steps that fp16 loss scaling skips do not count)",
    "collective_timeout": "seconds a collective waits for the other ranks before the job "
    "fails (a rank lost without closing its connections)",
    "compile": "torch.compile the model's forward and backward as one graph per phase "
    "(fullgraph, static shapes) with BACKEND (inductor when only --compile is "
    "given; aot_eager traces without generating code); data parallel with ZeRO 0-2",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain/run.py",
        description="Pretrain a token-dropping BERT with DeepSpeed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    numeric = {"keep_ratio": float, "dropout": float, "ema_beta": float}
    for f in fields(RunConfig):
        flag = "--" + (f.name if f.name == "deepspeed_config" else f.name.replace("_", "-"))
        kind = numeric.get(f.name, int if "int" in str(f.type) else str)
        kwargs = {"help": _HELP[f.name]}
        if f.name in ("data", "output", "deepspeed_config"):
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        if f.name == "token_drop":
            kwargs["choices"] = tuple(STRATEGIES)
        if f.name == "extend_positions":
            kwargs["choices"] = ("copy", "random")
        if f.type in (bool, "bool"):
            p.add_argument(flag, dest=f.name, action="store_true", **kwargs)
            continue
        if f.name == "compile":
            p.add_argument(
                flag, dest=f.name, nargs="?", const="inductor", metavar="BACKEND", **kwargs
            )
            continue
        p.add_argument(flag, dest=f.name, type=kind, **kwargs)
    # set by the deepspeed launcher; the rank comes from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> RunConfig:
    args = vars(build_parser().parse_args(argv))
    args.pop("local_rank")
    return RunConfig(**args)


@dataclass
class ResolvedRun:
    """A checked run: the run config, the model config, the data and the DeepSpeed dict."""

    run: RunConfig
    model: ModelConfig
    manifest: Manifest
    deepspeed: dict
    kept_tokens: int  # K; seq_len for a strategy that does not drop
    init: InitSource | None = None  # --init-from: where the weights come from

    def to_dict(self) -> dict:
        return {
            "run": self.run.to_dict(),
            "model": self.model.to_dict(),
            "data": {
                "dir": self.manifest.data_dir,
                "manifest_sha256": self.manifest.sha256,
                "seq_len": self.manifest.seq_len,
                "vocab_size": self.manifest.vocab_size,
                "tokenizer_sha256": self.manifest.raw["tokenizer"]["sha256"],
            },
            "deepspeed": self.deepspeed,
            "kept_tokens": self.kept_tokens,
            "init_from": None if self.init is None else self.init.to_dict(),
        }


def resolve(run: RunConfig) -> ResolvedRun:
    """Check everything that can be checked without starting DeepSpeed; raise ConfigError."""
    if not 0 < run.keep_ratio <= 1:
        raise ConfigError(f"--keep-ratio {run.keep_ratio}: must be in (0, 1]")
    for name in ("train_steps", "log_every", "eval_batches", "max_bad_steps", "collective_timeout"):
        if getattr(run, name) < 1:
            raise ConfigError(
                f"--{name.replace('_', '-')} {getattr(run, name)}: must be at least 1"
            )
    for name in ("eval_every", "save_every", "keep_checkpoints"):
        if getattr(run, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 0")
    if run.stop_at_step is not None and not 0 < run.stop_at_step <= run.train_steps:
        raise ConfigError(f"--stop-at-step {run.stop_at_step}: must be in [1, --train-steps]")
    if run.pipeline_stages < 1:
        raise ConfigError("--pipeline-stages: must be at least 1")
    if run.dropout is not None and not 0 <= run.dropout < 1:
        raise ConfigError(f"--dropout {run.dropout}: must be in [0, 1)")
    try:
        full_seq = run.full_seq_steps
    except ValueError:
        raise ConfigError(
            f"--full-seq-final {run.full_seq_final!r}: give steps (200) or a percentage (10%)"
        ) from None
    if not 0 <= full_seq <= run.train_steps:
        raise ConfigError(f"--full-seq-final {run.full_seq_final}: must be within --train-steps")
    if run.resume not in (None, "auto") and not os.path.exists(run.resume):
        raise ConfigError(f"--resume {run.resume}: no such checkpoint")
    if run.init_from is not None and run.resume not in (None, "auto"):
        raise ConfigError(
            f"--init-from {run.init_from} starts a new run, --resume {run.resume} continues "
            "one: give one of them"
        )
    if run.extend_positions is not None and run.init_from is None:
        raise ConfigError("--extend-positions needs --init-from (it extends SOURCE's positions)")
    if run.model is None and run.init_from is None:
        run.model = "bert-base"

    try:
        manifest = load_manifest(run.data)
        _verify_data(manifest, run.verify_data)
    except DataPrepError as e:
        raise ConfigError(f"--data: {e}") from None
    init = None
    if run.init_from is None:
        model = _model_config(run, manifest)
    else:
        init, model = _init_model_config(run, manifest)
    deepspeed = load_deepspeed_config(run)
    _check_apex(run, model, deepspeed)
    if manifest.seq_len > model.max_position_embeddings:
        raise ConfigError(
            f"the data's seq_len {manifest.seq_len} exceeds the model's "
            f"max_position_embeddings {model.max_position_embeddings}"
        )
    if not manifest.split("train")["rows"]:
        raise ConfigError(f"--data {run.data}: the train split is empty")
    drops = STRATEGIES[run.token_drop].drops
    kept = num_kept_tokens(manifest.seq_len, run.keep_ratio) if drops else manifest.seq_len
    if drops and kept == manifest.seq_len:
        raise ConfigError(f"--keep-ratio {run.keep_ratio} keeps every token; use --token-drop none")
    if not drops and run.keep_ratio != 0.5 and run.keep_ratio != 1:
        raise ConfigError("--keep-ratio has no effect with --token-drop none; leave it out")
    return ResolvedRun(run, model, manifest, deepspeed, kept, init)


def _check_apex(run: RunConfig, model: ModelConfig, ds: dict) -> None:
    """What asks for NVIDIA apex needs it installed (:mod:`pretrain.apex_support`)."""
    from pretrain import apex_support

    try:
        if model.kernels == "apex":
            apex_support.require(f'--model {run.model}: "kernels": "apex"')
        if apex_support.asks_for_lamb(ds):
            apex_support.require(
                f"--deepspeed_config {run.deepspeed_config}: the optimizer "
                f'"type": "{apex_support.LAMB_TYPE}"'
            )
    except apex_support.ApexUnavailable as e:
        raise ConfigError(str(e)) from None
    zero_stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if (
        apex_support.asks_for_lamb(ds)
        and zero_stage
        and not ds.get("zero_allow_untested_optimizer")
    ):
        raise ConfigError(
            f"--deepspeed_config {run.deepspeed_config}: ZeRO stage {zero_stage} with "
            f'{apex_support.LAMB_TYPE} needs "zero_allow_untested_optimizer": true (DeepSpeed '
            f"tests ZeRO only with its own optimizers)"
        )


def _verify_data(manifest: Manifest, sha256: bool) -> None:
    """Every shard against the manifest (:func:`data_prep.manifest.verify_shards`), with a
    progress bar on the first rank while checksums are computed."""
    from tqdm import tqdm

    from pretrain.distributed import launcher_rank

    total = sum(s.get("bytes", 0) for sp in manifest.raw["splits"].values() for s in sp["shards"])
    bar = None
    if sha256 and launcher_rank() == 0:
        bar = tqdm(
            total=total or None,
            desc="verify data",
            unit="B",
            unit_scale=True,
            leave=False,
            disable=None,  # a terminal only: the log of a batch job stays clean
        )
    try:
        verify_shards(manifest, sha256=sha256, progress=None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()


def _model_config(run: RunConfig, manifest: Manifest) -> ModelConfig:
    overrides = {} if run.dropout is None else {"dropout": run.dropout}
    try:
        if run.model in PRESETS:
            model = ModelConfig.from_preset(run.model, vocab_size=manifest.vocab_size, **overrides)
        elif os.path.isfile(run.model):
            with open(run.model) as f:
                given = json.load(f)
            model = ModelConfig.from_json(run.model)
            if "vocab_size" in given and given["vocab_size"] != manifest.vocab_size:
                raise ConfigError(
                    f"--model {run.model}: vocab_size {given['vocab_size']} does not match the "
                    f"data's vocabulary of {manifest.vocab_size} (leave vocab_size out to take the data's)"
                )
            data = {**model.to_dict(), "vocab_size": manifest.vocab_size, **overrides}
            model = ModelConfig(**data)
        else:
            raise ConfigError(
                f"--model {run.model}: neither a preset ({', '.join(PRESETS)}) nor a JSON file"
            )
    except (ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"--model {run.model}: {e}") from None
    return model


# model config fields that change no weight: a resumed or initialised run may set them anew
FREE_MODEL_FIELDS = ("dropout", "attention_dropout", "kernels")


def _init_model_config(run: RunConfig, manifest: Manifest) -> tuple[InitSource, ModelConfig]:
    """SOURCE's model (:mod:`pretrain.init_from`) with what ``--model`` and ``--dropout`` may
    set: the fields that change no weight. A ``--model`` that states another architecture
    is an error. ``--resume auto`` on a RUN_DIR with checkpoints takes the recorded ones."""
    from pretrain import init_from

    found = init_from.recorded_source(run.output, run.init_from) if run.resume else None
    if found is None:
        found = init_from.inspect_source(
            run.init_from, manifest, run.token_drop, run.extend_positions
        )
    source, model = found
    given = {} if run.model is None else _given_model_fields(run.model)
    if "vocab_size" in given and given["vocab_size"] != manifest.vocab_size:
        raise ConfigError(
            f"--model {run.model}: vocab_size {given['vocab_size']} does not match the data's "
            f"vocabulary of {manifest.vocab_size}"
        )
    given.pop("vocab_size", None)
    differ = [
        f"{k} {v} vs {getattr(model, k)}"
        for k, v in given.items()
        if k not in FREE_MODEL_FIELDS and getattr(model, k) != v
    ]
    if differ:
        raise ConfigError(
            f"--model {run.model} disagrees with --init-from {run.init_from} ("
            + ", ".join(differ)
            + "); leave --model out, the model comes from SOURCE"
        )
    overrides = {k: v for k, v in given.items() if k in FREE_MODEL_FIELDS}
    if run.dropout is not None:
        overrides["dropout"] = run.dropout
    try:
        return source, dataclasses.replace(model, **overrides)
    except ValueError as e:
        raise ConfigError(f"--model {run.model}: {e}") from None


def _given_model_fields(name: str) -> dict:
    """The model config fields a ``--model`` states: a preset's, or a JSON file's keys
    (with its ``"preset"`` expanded)."""
    if name in PRESETS:
        return dict(PRESETS[name])
    if not os.path.isfile(name):
        raise ConfigError(
            f"--model {name}: neither a preset ({', '.join(PRESETS)}) nor a JSON file"
        )
    try:
        return ModelConfig.json_fields(name)
    except ValueError as e:
        raise ConfigError(f"--model {name}: {e}") from None


def load_deepspeed_config(run: RunConfig) -> dict:
    """The DeepSpeed JSON with the run-derived fields filled in (see module docstring)."""
    path = run.deepspeed_config
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed_config {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed_config {path}: must hold a JSON object")
    if "train_batch_size" not in ds:
        raise ConfigError(f"--deepspeed_config {path}: set train_batch_size (the global batch)")
    scheduler = ds.get("scheduler", {})
    params = scheduler.setdefault("params", {}) if scheduler else {}
    if scheduler.get("type") in ("WarmupDecayLR", "WarmupCosineLR"):
        given = params.get("total_num_steps")
        if given is not None and given != run.train_steps:
            raise ConfigError(
                f"--deepspeed_config {path}: scheduler total_num_steps {given} differs from "
                f"--train-steps {run.train_steps}; leave it out, --train-steps sets it"
            )
        params["total_num_steps"] = run.train_steps
    board = ds.get("tensorboard")
    if isinstance(board, dict) and board.get("enabled"):
        board.setdefault("output_path", run.output)
    zero_stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if run.pipeline_stages > 1 and zero_stage > 1:
        raise ConfigError(
            f"--pipeline-stages {run.pipeline_stages} with ZeRO stage {zero_stage} "
            f"({path}): DeepSpeed's pipeline engine allows ZeRO stage 0 or 1 only"
        )
    if run.compile is not None:
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if run.compile not in backends:
            raise ConfigError(
                f"--compile {run.compile}: not a torch.compile backend; choose one of "
                f"{', '.join(backends)}"
            )
    if run.compile and (run.pipeline_stages > 1 or zero_stage > 2):
        raise ConfigError(
            f"--compile with {'--pipeline-stages' if run.pipeline_stages > 1 else 'ZeRO stage 3'}"
            f" ({path}): not supported; --compile needs data parallelism with ZeRO 0-2 (ZeRO-3's "
            f"parameter hooks and the pipeline's stages break the one graph)"
        )
    world = launcher_world_size()
    if run.pipeline_stages > 1 and world % run.pipeline_stages:
        raise ConfigError(
            f"--pipeline-stages {run.pipeline_stages} does not divide the {world} ranks"
        )
    if (ds.get("fp16", {}) or {}).get("enabled") and not _cuda():
        raise ConfigError(f"--deepspeed_config {path}: fp16 needs a GPU; use bf16 or fp32 on CPU")
    return ds


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
