"""``--init-from SOURCE``: a new run that starts from existing weights.

Two recipes need it: BERT's second phase at a longer sequence length (from a phase-1 run)
and continued pretraining of an existing BERT on a user's corpus. SOURCE is either

- a checkpoint of this project: a run directory, its ``checkpoints/`` or one tag directory
  (``latest`` where there is one), verified file by file as a resume verifies it; or
- a Hugging Face BERT directory: ``BertForMaskedLM`` or ``BertForPreTraining`` weights,
  exported by this project or any local copy of a public BERT, read offline.

What starts anew is what a resume would carry on: the optimizer and its schedule, the step
count (0) and the data order. What comes from SOURCE is the architecture (the model
config: a ``--model`` that disagrees with it is an error), the weights, and the importance
table when SOURCE is a checkpoint whose strategy learned one, the new strategy learns one
too, and the vocabulary is the same; otherwise the table starts fresh, and the start-up
line says which.

Everything that can be is checked before any heavy work (:func:`inspect_source`, called by
:func:`pretrain.config.resolve`): what SOURCE is, that it is a BERT this model can hold,
that its vocabulary is the data's token for token (SentencePiece data: the same tokenizer
file), and that its positions cover the data's sequence length, or that
``--extend-positions`` says how to make the missing rows:

    copy     row i of the extended table is learned row i mod P (P: SOURCE's positions), so
             every new row starts as a trained one (the choice Longformer made)
    random   the new rows are drawn as at initialisation, N(0, initializer_range), from a
             generator seeded by --seed: the same on every rank

The weights themselves are read on every rank as the model is built
(:func:`initial_weights`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from pretrain.config import ConfigError
from pretrain.importance import STRATEGIES
from pretrain.model import ModelConfig

EXTENSIONS = ("copy", "random")
HF_ARCHITECTURES = ("BertForMaskedLM", "BertForPreTraining")
_HF_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass
class InitSource:
    """What ``--init-from`` found, as recorded in ``config.json`` and every checkpoint."""

    given: str  # SOURCE as given on the command line
    kind: str  # "checkpoint" or "huggingface"
    path: str  # the checkpoint's tag directory or the Hugging Face directory, absolute
    step: int | None  # the checkpoint's step; None for a Hugging Face directory
    source_positions: int  # SOURCE's max_position_embeddings
    extend_positions: str | None  # how rows beyond them are made; None: not extended
    table: bool  # whether SOURCE's importance table is carried
    table_note: str  # why the table is carried or fresh
    vocabulary_note: str  # how the vocabulary was checked

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self, positions: int) -> str:
        """The start-up line: where the weights come from, the table, the positions."""
        where = (
            f"checkpoint {self.path} (step {self.step})"
            if self.kind == "checkpoint"
            else f"Hugging Face BERT {self.path}"
        )
        rows = (
            f"its {self.source_positions} position embeddings extended to {positions} by "
            f"{self.extend_positions}"
            if self.extend_positions
            else f"its {self.source_positions} position embeddings"
        )
        return (
            f"run.py: --init-from {where}: a new run from its weights, {rows}; "
            f"{self.table_note}; {self.vocabulary_note}"
        )


def _error(given: str, text: str) -> ConfigError:
    return ConfigError(f"--init-from {given}: {text}")


def _is_checkpoint(path: str) -> bool:
    return any(
        os.path.isfile(os.path.join(path, *name))
        for name in (("checkpoints", "latest"), ("latest",), ("run_state.json",))
    )


def inspect_source(
    given: str, manifest, token_drop: str, extend: str | None
) -> tuple[InitSource, ModelConfig]:
    """Check SOURCE against the data (``manifest``) and the run; returns what was found and
    SOURCE's architecture with the positions the run will have. Reads configuration files,
    tokenizers and checksums, no weights. Raises ConfigError."""
    if extend is not None and extend not in EXTENSIONS:
        raise ConfigError(f"--extend-positions {extend}: choose {' or '.join(EXTENSIONS)}")
    if not os.path.exists(given):
        raise _error(given, "no such file or directory")
    if _is_checkpoint(given):
        source, model = _checkpoint_source(given, manifest, token_drop)
    elif os.path.isfile(os.path.join(given, "config.json")):
        source, model = _hf_source(given, manifest)
    else:
        raise _error(
            given,
            "neither a checkpoint of this project (no checkpoints/latest or run_state.json) "
            "nor a Hugging Face model directory (no config.json)",
        )
    have, need = model.max_position_embeddings, manifest.seq_len
    if need > have and extend is None:
        raise _error(
            given,
            f"its {have} position embeddings do not cover the data's seq_len {need}; pass "
            "--extend-positions copy (the new rows repeat the learned ones) or random (drawn "
            "as at initialisation)",
        )
    if need <= have and extend is not None:
        raise ConfigError(
            f"--extend-positions {extend}: SOURCE's {have} position embeddings already cover "
            f"the data's seq_len {need}; leave it out"
        )
    if extend is not None:
        source.extend_positions = extend
        model = dataclasses.replace(model, max_position_embeddings=need)
    return source, model


# -- a checkpoint of this project ----------------------------------------------------------


def _checkpoint_source(given: str, manifest, token_drop: str) -> tuple[InitSource, ModelConfig]:
    from pretrain.checkpoint import find_checkpoint

    try:
        ref = find_checkpoint(given, given)  # verified against its files.json
        state = ref.run_state()
    except ConfigError as e:
        raise _error(given, str(e).replace(f"--resume {given}: ", "")) from None
    config = state["config"]
    model = ModelConfig(**config["model"])
    theirs = config["data"].get("tokenizer_sha256") or _tokenizer_sha256_of(
        given, config["data"]["dir"]
    )
    ours = manifest.raw["tokenizer"]["sha256"]
    if theirs != ours or model.vocab_size != manifest.vocab_size:
        raise _error(
            given,
            f"its vocabulary is not the data's (tokenizer sha256 {theirs[:12]} vs "
            f"{ours[:12]}, {model.vocab_size} vs {manifest.vocab_size} tokens); prepare "
            f"--data with `python -m data_prep --tokenizer` given the tokenizer of "
            f"{config['data']['dir']}",
        )
    theirs_strategy = config["run"]["token_drop"]
    if not STRATEGIES[token_drop].learns_from_loss:
        carried, note = False, f"no importance table carried (--token-drop {token_drop})"
    elif not STRATEGIES[theirs_strategy].learns_from_loss:
        carried, note = (
            False,
            f"a fresh importance table (SOURCE trained with --token-drop {theirs_strategy}, "
            "which learns none)",
        )
    else:
        carried, note = True, f"the importance table of step {state['step']}"
    source = InitSource(
        given=given,
        kind="checkpoint",
        path=ref.path,
        step=int(state["step"]),
        source_positions=model.max_position_embeddings,
        extend_positions=None,
        table=carried,
        table_note=note,
        vocabulary_note="the same tokenizer as SOURCE's data",
    )
    return source, model


def _tokenizer_sha256_of(given: str, data_dir: str) -> str:
    """The tokenizer hash of a checkpoint's data, for checkpoints that do not record it."""
    from data_prep.errors import DataPrepError
    from data_prep.manifest import load_manifest

    try:
        return load_manifest(data_dir).raw["tokenizer"]["sha256"]
    except DataPrepError as e:
        raise _error(
            given,
            f"its vocabulary cannot be checked: it does not record its tokenizer, and its "
            f"data is not readable ({e})",
        ) from None


# -- a Hugging Face BERT directory -----------------------------------------------------------


def _hf_source(given: str, manifest) -> tuple[InitSource, ModelConfig]:
    path = os.path.abspath(given)
    with open(os.path.join(path, "config.json")) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise _error(given, f"config.json is not valid JSON ({e})") from None
    if isinstance(raw, dict) and "run" in raw and "deepspeed" in raw:
        raise _error(given, "a run directory of this project that holds no checkpoint yet")
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise _error(given, "config.json is not a Hugging Face model config (no model_type)")
    if raw["model_type"] != "bert":
        raise _error(
            given,
            f"a {raw['model_type']} model, not BERT; --init-from reads BERT "
            f"({' or '.join(HF_ARCHITECTURES)} weights)",
        )
    from transformers import BertConfig

    hf = BertConfig.from_pretrained(path, local_files_only=True)
    architectures = hf.architectures or []
    if architectures and not set(architectures) & set(HF_ARCHITECTURES):
        raise _error(
            given,
            f"holds a {architectures[0]}, which has no masked-LM head to go on pretraining "
            f"with; give {' or '.join(HF_ARCHITECTURES)} weights",
        )
    unsupported = {
        "hidden_act": (hf.hidden_act, "gelu"),
        "position_embedding_type": (getattr(hf, "position_embedding_type", "absolute"), "absolute"),
        "is_decoder": (hf.is_decoder, False),
        "add_cross_attention": (hf.add_cross_attention, False),
        "tie_word_embeddings": (hf.tie_word_embeddings, True),
    }
    for name, (value, wanted) in unsupported.items():
        if value != wanted:
            raise _error(given, f"{name} {value!r}: this model implements {name} {wanted!r} only")
    if not any(os.path.isfile(os.path.join(path, name)) for name in _HF_WEIGHTS):
        raise _error(given, f"no weights ({' or '.join(_HF_WEIGHTS[::2])})")
    try:
        model = ModelConfig.from_hf_bert_config(hf)
    except ValueError as e:
        raise _error(given, f"cannot be trained with token dropping here: {e}") from None
    source = InitSource(
        given=given,
        kind="huggingface",
        path=path,
        step=None,
        source_positions=model.max_position_embeddings,
        extend_positions=None,
        table=False,
        table_note="a fresh importance table (a Hugging Face directory carries none)",
        vocabulary_note=_check_hf_vocabulary(given, path, model, manifest),
    )
    return source, model


def _check_hf_vocabulary(given: str, path: str, model: ModelConfig, manifest) -> str:
    """Compare SOURCE's tokenizer, token by token, with the data's; returns how it was
    checked. Without a tokenizer in SOURCE only the sizes can be compared."""
    from data_prep.errors import DataPrepError
    from data_prep.tokenizer import data_vocabulary

    if model.vocab_size != manifest.vocab_size:
        raise _error(
            given,
            f"its embeddings have {model.vocab_size} rows, the data's vocabulary "
            f"{manifest.vocab_size} tokens; prepare --data with `python -m data_prep "
            f"--tokenizer {given}`",
        )
    theirs = _hf_vocabulary(path)
    if theirs is None:
        return (
            f"SOURCE has no tokenizer, so only its vocabulary size ({model.vocab_size}) was "
            "checked against the data's"
        )
    try:
        ours = data_vocabulary(manifest.data_dir)
    except DataPrepError as e:
        raise ConfigError(f"--data: {e}") from None
    if theirs != ours:
        first = next(
            (i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours))
        )
        at = lambda tokens: repr(tokens[first]) if first < len(tokens) else "nothing"  # noqa: E731
        raise _error(
            given,
            f"its tokenizer's vocabulary is not the data's (id {first}: {at(theirs)} vs "
            f"{at(ours)}); prepare --data with `python -m data_prep --tokenizer {given}`",
        )
    return f"its tokenizer's {len(theirs)} tokens are the data's"


def _hf_vocabulary(path: str) -> list[str] | None:
    """The token of every id of the tokenizer in a Hugging Face directory, or None."""
    names = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--init-from {path}: its tokenizer does not load ({e})") from None
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def recorded_source(run_dir: str, given: str) -> tuple[InitSource, ModelConfig] | None:
    """For ``--init-from SOURCE --resume auto`` on a RUN_DIR with checkpoints: what the run
    was initialised from and its model, from ``latest``'s record (SOURCE itself is not
    read: the run goes on from its own checkpoint); None when there is none. Raises
    ConfigError when the run was started from another SOURCE, or from none."""
    from pretrain.checkpoint import find_latest

    ref = find_latest(os.path.join(run_dir, "checkpoints"))
    if ref is None:
        return None
    config = ref.run_state()["config"]
    recorded = config.get("init_from")
    if recorded is None or os.path.abspath(recorded["given"]) != os.path.abspath(given):
        started = f"--init-from {recorded['given']}" if recorded else "no --init-from"
        raise ConfigError(
            f"--init-from {given} --resume auto: {run_dir} holds checkpoints of a run started "
            f"with {started}; give the command it was started with"
        )
    return InitSource(**recorded), ModelConfig(**config["model"])


# -- the weights, on every rank ------------------------------------------------------------------


def initial_weights(
    source: InitSource, model: ModelConfig, seed: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """(fp32 weights under :class:`~pretrain.model.BertForTokenDropPretraining` names, with
    the positions extended, and SOURCE's importance table or None)."""
    if source.kind == "checkpoint":
        weights, table = _checkpoint_weights(source)
    else:
        weights, table = _hf_weights(source), None
    name = "embeddings.position_embeddings.weight"
    weights[name] = extend_positions(
        weights[name],
        model.max_position_embeddings,
        source.extend_positions,
        model.initializer_range,
        seed,
    )
    return weights, table


def _checkpoint_weights(source: InitSource) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    from pretrain.checkpoint import CheckpointRef
    from pretrain.export import ExportError, read_weights

    ref = CheckpointRef(os.path.dirname(source.path), os.path.basename(source.path))
    try:
        _, weights, client = read_weights(ref)
    except ExportError as e:
        raise ConfigError(f"--init-from {source.given}: {e}") from None
    table = client["importance"]["table"].float() if source.table else None
    return weights, table


def _hf_weights(source: InitSource) -> dict[str, torch.Tensor]:
    from transformers import BertForMaskedLM

    from pretrain.model import from_hf_bert_state_dict

    hf, info = BertForMaskedLM.from_pretrained(
        source.path, local_files_only=True, output_loading_info=True, dtype=torch.float32
    )
    if info["missing_keys"]:
        raise ConfigError(
            f"--init-from {source.given}: its weights lack {sorted(info['missing_keys'])[0]} "
            f"(and {len(info['missing_keys']) - 1} more); give {' or '.join(HF_ARCHITECTURES)} "
            "weights"
        )
    state = {k: v.detach().float() for k, v in hf.state_dict().items()}
    return from_hf_bert_state_dict(state, hf.config.num_hidden_layers)


def extend_positions(
    weight: torch.Tensor, rows: int, how: str | None, std: float, seed: int
) -> torch.Tensor:
    """The position-embedding table [P, H] grown to ``rows`` (see the module docstring);
    unchanged when ``how`` is None."""
    if how is None:
        return weight
    have = weight.shape[0]
    if how == "copy":
        return weight[torch.arange(rows) % have].clone()
    generator = torch.Generator().manual_seed(seed)
    new = torch.empty(rows - have, weight.shape[1]).normal_(0.0, std, generator=generator)
    return torch.cat([weight, new.to(weight.dtype)])
