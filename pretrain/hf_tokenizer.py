"""The data's SentencePiece tokenizer as a Hugging Face fast tokenizer (``tokenizer.json``).

``build_fast_tokenizer`` converts ``DATA_DIR/tokenizer.model`` with transformers' own
SentencePiece converter, ``SpmConverter``, which reads the model proto through protobuf
(pieces and scores, the unigram or BPE model, byte fallback, the precompiled
normalisation map) and builds the ``tokenizers`` pipeline SentencePiece's encoder
amounts to. On top of it come what BERT needs: the special tokens at the manifest's
ids, the ``[CLS] A [SEP] B [SEP]`` template with token type ids, right padding with
``[PAD]``. ``save_tokenizer`` writes it for ``AutoTokenizer.from_pretrained``.

Agreement with data_prep (``tests/test_hf_tokenizer.py`` measures it on held-out text,
against the ids in the shards):

- Plain text gives the ids data_prep wrote.
- Deliberate difference: a literal ``[MASK]`` (likewise ``[CLS]``, ``[SEP]``,
  ``[PAD]``, ``[UNK]``) in the text becomes that special token, as in every Hugging
  Face tokenizer and as the fill-mask pipeline needs; SentencePiece encodes it as
  characters (its control symbols never come out of text).
- Unigram ties: where two segmentations score exactly the same (repeated substrings
  such as ``quiquiqui``), SentencePiece and ``tokenizers`` may pick different ones.
- Unicode composition. ``tokenizers``' ``Precompiled`` normaliser applies
  SentencePiece's map differently on non-NFC input (huggingface/tokenizers#2116,
  #2334): it leaves decomposed Hangul and kana decomposed and drops the second of two
  combining marks. The conversion composes (NFC) first, which makes NFD text agree.
  The cost is text that is neither NFC nor NFD, a precomposed letter followed by
  another combining mark (Vietnamese typed as ``â`` + U+0301): NFC makes it ``ấ``,
  SentencePiece's map leaves it as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
from types import SimpleNamespace

from tokenizers import decoders, normalizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import (
    SentencePieceExtractor,
    SpmConverter,
    generate_merges,
    import_protobuf,
)

from data_prep.manifest import SENTENCEPIECE, load_manifest

# SentencePiece's enums (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL = 1, 2, 3
_UNIGRAM, _BPE = 1, 2
# SentencePiece normalisation rules built on NFKC (data_prep's models use nmt_nfkc)
_NFKC_RULES = {"nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf"}


class TokenizerConversionError(Exception):
    """A tokenizer that cannot be converted to an equivalent fast tokenizer."""


def build_fast_tokenizer(data_dir: str, model_max_length: int) -> PreTrainedTokenizerFast:
    """A fast tokenizer equivalent to DATA_DIR's SentencePiece model (see the module
    docstring for the differences).

    ``model_max_length`` is the model's ``max_position_embeddings``. The special tokens
    get the ids of ``manifest.json``; a pair encodes as ``[CLS] A [SEP] B [SEP]`` with
    token type ids 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]``; padding and truncation
    are on the right. Raises ``DataPrepError`` for a bad DATA_DIR and
    ``TokenizerConversionError`` for a tokenizer this conversion would not reproduce.
    """
    manifest = load_manifest(data_dir)
    if manifest.tokenizer_kind != SENTENCEPIECE:
        raise TokenizerConversionError(
            f"{data_dir}: its tokenizer is a Hugging Face tokenizer already "
            f"({manifest.tokenizer_path}); there is nothing to convert"
        )
    model_path = manifest.tokenizer_path
    proto = _read_model(model_path, manifest.raw["tokenizer"].get("sha256"))
    ids = dataclasses.asdict(manifest.special)  # {"pad": 0, "unk": 1, ...}
    pieces = {name: _special_piece(proto, name, i, model_path) for name, i in ids.items()}

    # SpmConverter reads only ``vocab_file`` from the slow tokenizer it normally gets
    backend = _BertSpmConverter(SimpleNamespace(vocab_file=model_path)).converted()
    backend.post_processor = TemplateProcessing(
        single=f"{pieces['cls']}:0 $A:0 {pieces['sep']}:0",
        pair=f"{pieces['cls']}:0 $A:0 {pieces['sep']}:0 $B:1 {pieces['sep']}:1",
        special_tokens=[(pieces["cls"], ids["cls"]), (pieces["sep"], ids["sep"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{f"{name}_token": piece for name, piece in pieces.items()},
        model_max_length=model_max_length,
        padding_side="right",
        truncation_side="right",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        # decode() gives SentencePiece's text, without BERT's " ." -> "." clean-up
        clean_up_tokenization_spaces=False,
    )
    for name, i in ids.items():
        got = tokenizer.convert_tokens_to_ids(pieces[name])
        assert got == i, f"{pieces[name]} became id {got}; the manifest says {i}"
    return tokenizer


def save_tokenizer(data_dir: str, out_dir: str, model_max_length: int) -> None:
    """Write DATA_DIR's tokenizer to ``out_dir`` with ``save_pretrained``:
    ``tokenizer.json`` and ``tokenizer_config.json`` (transformers 5 keeps the special
    tokens in the latter and writes no ``special_tokens_map.json``).

    ``AutoTokenizer.from_pretrained(out_dir)`` loads it as a fast tokenizer, offline and
    without sentencepiece.
    """
    build_fast_tokenizer(data_dir, model_max_length).save_pretrained(out_dir)


def _read_model(path: str, sha256: str | None):
    """The model proto of ``path``, checked against the manifest's hash and for settings
    ``SpmConverter``'s pipeline does not reproduce."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerConversionError(f"{path}: cannot read the tokenizer ({e})") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise TokenizerConversionError(
            f"{path}: not the tokenizer this data was encoded with (its sha256 differs from "
            "manifest.json's); restore the original file or run data_prep again"
        )
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(data)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if trainer.model_type not in (_UNIGRAM, _BPE):
        problems.append(f"model type {trainer.model_type} (only unigram and bpe convert)")
    if not norm.add_dummy_prefix:
        problems.append("add_dummy_prefix is off")
    if not norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces is off")
    if not norm.escape_whitespaces:
        problems.append("escape_whitespaces is off")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix is on")
    if problems:
        raise TokenizerConversionError(
            f"{path}: a fast tokenizer would not reproduce this SentencePiece model: "
            + "; ".join(problems)
            + " (the models data_prep trains have SentencePiece's defaults, which convert)"
        )
    return proto


def _special_piece(proto, name: str, index: int, path: str) -> str:
    """The piece at a special token's manifest id: a control symbol ([UNK]: the unknown
    piece), as data_prep requires."""
    wanted = _UNKNOWN if name == "unk" else _CONTROL
    if not 0 <= index < len(proto.pieces) or proto.pieces[index].type != wanted:
        kind = "the unknown piece" if name == "unk" else "a control symbol"
        raise TokenizerConversionError(
            f"{path}: manifest.json puts the {name} token at id {index}, which is not {kind} "
            "of this tokenizer; manifest.json and the tokenizer do not belong together"
        )
    return proto.pieces[index].piece


class _BpeMergesExtractor(SentencePieceExtractor):
    """What ``SpmConverter``'s BPE branch calls: ``extract(vocab_scores)`` returning
    ``(vocab, merges)``. transformers 5 changed ``SentencePieceExtractor.extract`` (it
    takes a model class now) and the branch fails with it; this restores the call, with
    transformers' ``generate_merges`` ordering merges by the merged piece's score, the
    order in which SentencePiece's BPE applies them."""

    def extract(self, vocab_scores):
        vocab = {p.piece: i for i, p in enumerate(self.proto.pieces)}
        # SentencePiece never merges into control, unknown, byte or unused pieces
        skip = [p.piece for p in self.proto.pieces if p.type != _NORMAL]
        return vocab, generate_merges(vocab, vocab_scores, skip_tokens=skip)


class _BertSpmConverter(SpmConverter):
    """``SpmConverter`` with the model's byte fallback (encoding and decoding) and NFC
    before SentencePiece's normalisation map."""

    # only silences SpmConverter's byte-fallback warning; tokenizer() sets the model's
    handle_byte_fallback = True
    SpmExtractor = _BpeMergesExtractor

    def tokenizer(self, proto):
        self.handle_byte_fallback = proto.trainer_spec.byte_fallback
        return super().tokenizer(proto)

    def normalizer(self, proto):
        spm_normalizer = super().normalizer(proto)
        if proto.normalizer_spec.name not in _NFKC_RULES:
            return spm_normalizer
        # tokenizers' Precompiled maps a grapheme as a whole only under 6 bytes and drops
        # what follows a matched prefix: decomposed (NFD) Hangul and kana stay decomposed,
        # a letter with two combining marks loses one. Composed first, the text reaches it
        # as SentencePiece's NFKC-based map would leave it.
        return normalizers.Sequence([normalizers.NFC(), spm_normalizer])

    def decoder(self, replacement, add_prefix_space):
        metaspace = super().decoder(replacement, add_prefix_space)
        if not self.proto.trainer_spec.byte_fallback:
            return metaspace
        # byte pieces (<0xE2><0x82><0xAC>) back to the character they encode first
        return decoders.Sequence([decoders.ByteFallback(), metaspace])
