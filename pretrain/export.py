"""``python -m pretrain.export RUN_DIR --output HF_DIR``: a checkpoint as a Hugging Face BERT.

    python -m pretrain.export RUN_DIR [--checkpoint TAG|PATH] --output HF_DIR [--data DATA_DIR]
        [--overwrite]

Reads any checkpoint the trainer writes and writes a directory that
``AutoModelForMaskedLM``, ``AutoModel`` and ``AutoTokenizer`` load offline:

    config.json, model.safetensors   a BertForMaskedLM: the encoder and the MLM head (its bias too)
    tokenizer.json, tokenizer_config.json, ...
                                     the data's tokenizer: a SentencePiece model converted
                                     to a fast tokenizer (pretrain.hf_tokenizer), the
                                     manifest's special ids; a Hugging Face tokenizer
                                     (data_prep --tokenizer DIR): its files, byte for byte
    importance_table.tsv             token_id, piece, count in the train split, score
    README.md                        a model card: data, steps, token dropping, validation loss

Where the weights come from, by checkpoint kind:

    ZeRO stage 0        the ``module`` of DeepSpeed's model-states file
    ZeRO stages 1-3     DeepSpeed's own consolidation, ``zero_to_fp32`` (the fp32 master weights)
    pipeline            the layer files, mapped back to model names through the layer plan
                        (pretrain.pipeline.pipeline_parameter_names)
    universal           each parameter's ``zero/<name>/fp32.pt``

The output appears whole or not at all: it is written into a temporary sibling directory
and renamed when complete. A checkpoint that ``latest`` does not name is checked for
its files first; a half-written one is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import io
import json
import math
import os
import shutil
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from data_prep.atomic import TMP_MARK, replace_directory  # noqa: E402
from data_prep.errors import DataPrepError  # noqa: E402
from data_prep.manifest import HUGGINGFACE, Manifest, load_manifest  # noqa: E402
from data_prep.tokenizer import open_tokenizer  # noqa: E402
from pretrain.checkpoint import CheckpointRef, find_checkpoint, verify  # noqa: E402
from pretrain.config import ConfigError  # noqa: E402
from pretrain.model import BertForTokenDropPretraining, ModelConfig, hf_bert_state_dict  # noqa: E402

TABLE_FILE = "importance_table.tsv"


class ExportError(Exception):
    """What stops an export: printed as one line, exit code 2."""


# -- the checkpoint -----------------------------------------------------------------------


def checkpoint_of(run_dir: str, checkpoint: str | None) -> CheckpointRef:
    """The checkpoint to export: RUN_DIR's ``latest``, a tag in RUN_DIR/checkpoints, or a
    checkpoint directory given as a path."""
    if checkpoint is None:
        try:
            return find_checkpoint(run_dir, run_dir)
        except ConfigError as e:
            raise ExportError(str(e).replace("--resume ", "")) from None
    for path in (os.path.join(run_dir, "checkpoints", checkpoint), checkpoint):
        if os.path.isdir(path):
            path = os.path.abspath(path.rstrip("/"))
            ref = CheckpointRef(os.path.dirname(path), os.path.basename(path))
            try:
                verify(ref)
            except ConfigError as e:
                raise ExportError(str(e)) from None
            return ref
    raise ExportError(f"--checkpoint {checkpoint}: no such checkpoint in {run_dir}/checkpoints")


def _run_state(ref: CheckpointRef) -> dict:
    try:
        return ref.run_state()
    except ConfigError as e:
        raise ExportError(f"{e} (a half-written checkpoint?)") from None


def load_deepspeed_file(path: str) -> dict:
    """A file DeepSpeed wrote into a checkpoint, on the CPU. They are pickles: a checkpoint
    is as trusted as code."""
    return torch.load(path, map_location="cpu", weights_only=False)


def _kind(state: dict) -> str:
    config = state["config"]
    if state.get("universal"):
        return "universal"
    if config["run"]["pipeline_stages"] > 1:
        return "pipeline"
    stage = (config["deepspeed"].get("zero_optimization") or {}).get("stage", 0)
    return f"zero{stage}"


def _expected_files(ref: CheckpointRef, state: dict, kind: str) -> list[str]:
    """The files a complete checkpoint of ``kind`` has, as far as export reads them."""
    world = state["world_size"]
    if kind == "universal":
        return [model_states_file(ref), "zero"]
    if kind == "zero0":
        return ["mp_rank_00_model_states.pt"]
    if kind == "pipeline":
        stages = state["config"]["run"]["pipeline_stages"]
        return [f"mp_rank_{s:02d}_model_states.pt" for s in range(stages)]
    files = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    if kind == "zero3":
        return files + [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
    return ["mp_rank_00_model_states.pt", *files]


def model_states_file(ref: CheckpointRef) -> str:
    """Rank 0's model-states file, which also holds the client state (ZeRO-3 names it per rank)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.exists(os.path.join(ref.path, name)):
            return name
    return "mp_rank_00_model_states.pt"


def read_weights(ref: CheckpointRef) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(model config, fp32 state dict under BertForTokenDropPretraining's names, the
    checkpoint's client state) of checkpoint ``ref``."""
    state = _run_state(ref)
    kind = _kind(state)
    missing = [
        f
        for f in _expected_files(ref, state, kind)
        if not os.path.exists(os.path.join(ref.path, f))
    ]
    if missing:
        raise ExportError(f"{ref.path}: incomplete checkpoint, {missing[0]} is missing")
    cfg = ModelConfig(**state["config"]["model"])
    client = load_deepspeed_file(os.path.join(ref.path, model_states_file(ref)))
    try:
        if kind == "zero0":
            weights = dict(client["module"])
        elif kind == "universal":
            # {"param": tensor} from ZeRO 1-2, the flattened tensor itself from ZeRO-3
            with torch.device("meta"):
                shapes = {
                    k: v.shape for k, v in BertForTokenDropPretraining(cfg).state_dict().items()
                }
            weights = {}
            for path in glob.glob(os.path.join(ref.path, "zero", "*", "fp32.pt")):
                name = os.path.basename(os.path.dirname(path))
                saved = load_deepspeed_file(path)
                tensor = saved["param"] if isinstance(saved, dict) else saved
                weights[name] = tensor.reshape(shapes[name])
        elif kind == "pipeline":
            weights = _pipeline_weights(ref, cfg)
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with contextlib.redirect_stdout(io.StringIO()):
                weights = get_fp32_state_dict_from_zero_checkpoint(ref.directory, tag=ref.tag)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise ExportError(f"{ref.path}: cannot read the {kind} checkpoint ({e})") from None
    # the decoder is tied to the word embeddings: some layouts store the weight once
    weights.setdefault("mlm_head.decoder.weight", weights.get("embeddings.word_embeddings.weight"))
    return cfg, {k: v.float() for k, v in weights.items() if v is not None}, client


def _pipeline_weights(ref: CheckpointRef, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from pretrain.pipeline import pipeline_parameter_names

    weights = {}
    for index, prefixes in enumerate(pipeline_parameter_names(cfg)):
        path = os.path.join(ref.path, f"layer_{index:02d}-model_states.pt")
        if not os.path.exists(path):
            continue  # a tied copy (the decoder) or a step without parameters (the merge)
        for name, tensor in load_deepspeed_file(path).items():
            attr, _, rest = name.partition(".")
            model_name = prefixes[attr] + (f".{rest}" if rest else "")
            weights[model_name] = tensor
    return weights


def load_model(ref: CheckpointRef) -> tuple[BertForTokenDropPretraining, dict]:
    """The checkpoint's model in fp32 (eval mode), and its client state."""
    cfg, weights, client = read_weights(ref)
    model = BertForTokenDropPretraining(cfg)
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"{ref.path}: the checkpoint does not match its model config (missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    return model.eval(), client


# -- the Hugging Face directory -------------------------------------------------------------


def hf_config(cfg: ModelConfig, manifest: Manifest):
    """The ``transformers.BertConfig`` of the trained network."""
    from transformers import BertConfig

    return BertConfig(
        **cfg.to_hf_bert_config(),
        pad_token_id=manifest.special.pad,
        position_embedding_type="absolute",
        architectures=["BertForMaskedLM"],
    )


def _manifest_of(state: dict, data_dir: str | None) -> Manifest:
    data = state["config"]["data"]
    where = data_dir or data["dir"]
    try:
        manifest = load_manifest(where)
    except DataPrepError as e:
        raise ExportError(
            f"the run's data ({where}) is needed for its tokenizer: {e}; pass --data DATA_DIR"
        ) from None
    if manifest.sha256 != data["manifest_sha256"]:
        raise ExportError(f"{where} is not the data this run trained on (manifest differs)")
    return manifest


def _data_tokenizer(manifest: Manifest, model_max_length: int):
    """(write(out_dir), the token of every id): the data's tokenizer as the export holds it.

    Hugging Face data: its own files, byte for byte (checked against the manifest's
    hashes), so the model keeps exactly the tokenizer it was pretrained with. SentencePiece
    data: converted to a fast tokenizer, ``model_max_length`` the model's positions.
    """
    from pretrain.hf_tokenizer import TokenizerConversionError, build_fast_tokenizer

    section = manifest.raw["tokenizer"]
    try:
        if manifest.tokenizer_kind == HUGGINGFACE:
            pieces = open_tokenizer(manifest.data_dir, section).vocabulary()

            def write(out_dir: str) -> None:
                for name in section["files"]:
                    shutil.copyfile(
                        os.path.join(manifest.tokenizer_path, name), os.path.join(out_dir, name)
                    )

            return write, pieces
        tokenizer = build_fast_tokenizer(manifest.data_dir, model_max_length)
    except (DataPrepError, TokenizerConversionError) as e:
        raise ExportError(str(e)) from None
    return tokenizer.save_pretrained, tokenizer.convert_ids_to_tokens(
        list(range(manifest.vocab_size))
    )


def _table_rows(client: dict, manifest: Manifest, pieces: list[str]) -> list[list]:
    table = client["importance"]["table"].tolist()
    counts = manifest.token_counts()
    return [[i, pieces[i], int(counts[i]), f"{score:.6g}"] for i, score in enumerate(table)]


def _final_validation(run_dir: str, step: int) -> dict | None:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    last = None
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "val_loss" in record and record["step"] <= step:
                last = record
    return last


def _model_card(state: dict, manifest: Manifest, validation: dict | None) -> str:
    run, model = state["config"]["run"], state["config"]["model"]
    train = manifest.split("train")
    kept = state["config"]["kept_tokens"]
    val = (
        f"{validation['val_loss']:.4f} (perplexity {math.exp(validation['val_loss']):.1f}), "
        f"accuracy {validation['val_acc']:.4f} at step {validation['step']}"
        if validation
        else "not measured"
    )
    section = manifest.raw["tokenizer"]
    tokenizer = (
        f"Hugging Face `{section['class']}`, the data's own files, unchanged: "
        + ", ".join(f"`{name}`" for name in section["files"])
        if manifest.tokenizer_kind == HUGGINGFACE
        else "SentencePiece, converted to `tokenizer.json`"
    )
    drop = (
        "none (dense)"
        if run["token_drop"] == "none"
        else f"{run['token_drop']}, keep ratio {run['keep_ratio']} ({kept} of "
        f"{manifest.seq_len} tokens in the middle layers), EMA beta {run['ema_beta']}, last "
        f"{run['full_seq_final']} steps without dropping"
    )
    return f"""---
library_name: transformers
tags: [bert, fill-mask, token-dropping]
---

# BERT pretrained with token dropping

A BERT masked-language model (`BertForMaskedLM`, MLM objective only, no next-sentence
prediction), pretrained with token dropping (Hou et al., ACL 2022): the middle encoder
layers processed only the most important tokens of each sequence. The exported network is
a standard BERT: inference and fine-tuning see every token.

| | |
|---|---|
| model | {model["num_layers"]} layers, hidden {model["hidden_size"]}, {model["num_heads"]} heads, FFN {model["intermediate_size"]}, vocabulary {model["vocab_size"]} |
| data | `{manifest.data_dir}` (manifest sha256 {manifest.sha256[:12]}), {train["tokens"]:,} train tokens in sequences of {manifest.seq_len} |
| tokenizer | {tokenizer} |
| steps | {state["step"]} of {run["train_steps"]} ({state["consumed_samples"]:,} sequences seen) |
| token dropping | {drop} |
| validation MLM loss | {val} (full sequence, 15% masking) |

`{TABLE_FILE}` holds the final importance table: each token id, its piece, its count in
the train split and its score (for `loss_ema`, the moving average of its MLM loss).
"""


def export_run(
    run_dir: str,
    out_dir: str,
    checkpoint: str | None = None,
    data_dir: str | None = None,
    overwrite: bool = False,
) -> str:
    """Export checkpoint ``checkpoint`` (default: latest) of ``run_dir`` to ``out_dir``;
    returns ``out_dir``. Raises ExportError."""
    from transformers import BertForMaskedLM

    out_dir = os.path.abspath(out_dir.rstrip("/"))
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ExportError(f"--output {out_dir} exists and is not empty; pass --overwrite")
    ref = checkpoint_of(run_dir, checkpoint)
    state = _run_state(ref)
    manifest = _manifest_of(state, data_dir)
    model, client = load_model(ref)
    config = hf_config(model.cfg, manifest)
    hf = BertForMaskedLM(config)
    hf.load_state_dict(hf_bert_state_dict(model), strict=True)
    write_tokenizer, pieces = _data_tokenizer(manifest, model.cfg.max_position_embeddings)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    for stale in glob.glob(f"{glob.escape(out_dir)}{TMP_MARK}*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{out_dir}{TMP_MARK}{os.getpid()}"
    try:
        hf.save_pretrained(tmp)
        write_tokenizer(tmp)
        with open(os.path.join(tmp, TABLE_FILE), "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
            writer.writerow(["token_id", "piece", "count", "score"])
            writer.writerows(_table_rows(client, manifest, pieces))
        card = _model_card(state, manifest, _final_validation(run_dir, state["step"]))
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(card)
        replace_directory(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", help="RUN_DIR of pretrain/run.py")
    p.add_argument("--output", required=True, help="HF_DIR to write")
    p.add_argument("--checkpoint", help="a tag in RUN_DIR/checkpoints or a checkpoint path")
    p.add_argument(
        "--data", help="DATA_DIR, if it moved since the run (the tokenizer comes from it)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    args = p.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.output, args.checkpoint, args.data, args.overwrite)
    except ExportError as e:
        print(f"pretrain.export: error: {e}", file=sys.stderr)
        return 2
    print(f"pretrain.export: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
