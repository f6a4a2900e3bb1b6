"""Phase 1: the tokenizer, trained on a bounded, seeded sample, or brought by the user;
and, for every consumer of a DATA_DIR, the data's tokenizer (:func:`open_data_tokenizer`,
:func:`data_vocabulary`).

Two kinds, named by the manifest's ``tokenizer.kind``:

- ``sentencepiece``: ``DATA_DIR/tokenizer.model``, trained here or a user's model file.
  Special tokens are control symbols, so they never come out of encoding text (a literal
  "[MASK]" in the corpus is ordinary text). A trained model has [PAD]=0, [UNK]=1,
  [CLS]=2, [SEP]=3, [MASK]=4; a user's model may place them anywhere, which is why every
  consumer reads the ids from the manifest.
- ``huggingface``: ``DATA_DIR/tokenizer/``, the files of a user's Hugging Face fast
  tokenizer (``--tokenizer DIR``, e.g. the BERT whose pretraining continues on this data),
  copied unchanged. Its own pad/unk/cls/sep/mask tokens are the special tokens, and text
  is encoded as SentencePiece text is: without special tokens, a literal "[MASK]" in the
  corpus being text (``split_special_tokens``), as BERT's own data preparation read it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import random
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.manifest import HUGGINGFACE, SENTENCEPIECE, load_manifest
from data_prep.sources import Source, Utf8Counter, iter_documents, plan_units

SP_MODEL_FILE = "tokenizer.model"  # in DATA_DIR, for the sentencepiece kind
HF_DIR = "tokenizer"  # in DATA_DIR, for the huggingface kind
# the files a Hugging Face tokenizer consists of: what is copied (not weights, not config.json)
HF_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "added_tokens.json",
)
SPECIAL_PIECES = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
# SentencePiece skips training sentences over 4192 bytes; longer lines are cut at spaces.
_MAX_SENTENCE_CHARS = 1000
# SentencePiece's result depends on its thread count, so it is fixed (not --workers):
# the same inputs give the same tokenizer on any machine.
TRAIN_THREADS = 8
# The sample is drawn from pieces of this size, cut independently of the encode units.
SAMPLE_PIECE_BYTES = 1 << 20


def open_model(model_bytes: bytes, source: str):
    """A ``SentencePieceProcessor`` for a model's bytes, or a clear error."""
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_proto=model_bytes)
    except Exception as e:  # sentencepiece raises RuntimeError or OSError
        raise DataPrepError(f"{source}: not a SentencePiece model ({e})") from None


def special_ids(sp, source: str) -> dict[str, int]:
    """The ids of the five special tokens in a SentencePiece model, or a clear error."""
    ids, missing = {}, []
    for name, piece in SPECIAL_PIECES.items():
        i = sp.piece_to_id(piece)
        if sp.id_to_piece(i) != piece:  # piece_to_id answers unk_id for unknown pieces
            missing.append(piece)
        ids[name] = i
    if missing:
        raise DataPrepError(
            f"{source}: the tokenizer lacks the special token(s) {' '.join(missing)}; "
            "train it with them as control symbols, or let data_prep train one "
            "(leave out --tokenizer)"
        )
    if len(set(ids.values())) != len(ids):
        raise DataPrepError(f"{source}: special tokens share ids: {ids}")
    return ids


def vocab_text(sp) -> bytes:
    """``tokenizer.vocab``: one ``piece<TAB>score`` line per id."""
    ids = list(range(sp.get_piece_size()))
    pieces, scores = sp.id_to_piece(ids), sp.get_score(ids)  # one call each, not one per id
    return "".join(f"{p}\t{s:g}\n" for p, s in zip(pieces, scores)).encode()


def sample_documents(
    sources: list[Source], budget_bytes: int, seed: int, text_field: str
) -> Iterator[str]:
    """Documents from ~1 MB pieces of the corpus, taken in a seeded random order until
    ``budget_bytes``."""
    units = plan_units(sources, SAMPLE_PIECE_BYTES)
    order = list(range(len(units)))
    random.Random(seed).shuffle(order)
    taken = 0
    utf8 = Utf8Counter()
    for u in order:
        for segment in units[u].segments:
            for doc in iter_documents(segment, text_field, utf8):
                yield doc.decode("utf-8")
                taken += len(doc)
                if taken >= budget_bytes:
                    return


def train_tokenizer(
    sources: list[Source],
    vocab_size: int,
    model_type: str,
    sample_bytes: int,
    seed: int,
    text_field: str,
    character_coverage: float,
    byte_fallback: bool,
) -> bytes:
    """Train a SentencePiece model on a sample of the corpus; return its bytes."""
    import sentencepiece as spm

    # the sample is read before training starts, so that bad input surfaces as our error
    # rather than inside SentencePiece's iterator (bounded by budget_bytes)
    sentences = [
        piece
        for doc in sample_documents(sources, sample_bytes, seed, text_field)
        for line in doc.split("\n")
        for piece in _cut(line.strip())
    ]
    if not sentences:
        raise DataPrepError("the inputs hold no text (every file is empty or whitespace)")

    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=out,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece=SPECIAL_PIECES["pad"],
            unk_piece=SPECIAL_PIECES["unk"],
            bos_piece=SPECIAL_PIECES["cls"],
            eos_piece=SPECIAL_PIECES["sep"],
            control_symbols=[SPECIAL_PIECES["mask"]],
            num_threads=TRAIN_THREADS,
            minloglevel=2,
        )
    except RuntimeError as e:
        message = str(e).split("] ", 1)[-1]
        if "Vocabulary size too high" in message:
            raise DataPrepError(
                f"--vocab-size {vocab_size}: the corpus cannot support that many pieces "
                f"({message.strip()}); lower --vocab-size or add text"
            ) from None
        raise DataPrepError(f"training the tokenizer failed: {message.strip()}") from None
    return out.getvalue()


def _cut(line: str) -> Iterator[str]:
    while len(line) > _MAX_SENTENCE_CHARS:
        cut = line.rfind(" ", 0, _MAX_SENTENCE_CHARS)
        cut = cut if cut > 0 else _MAX_SENTENCE_CHARS
        yield line[:cut]
        line = line[cut:].lstrip()
    if line:
        yield line


@dataclass(frozen=True)
class GivenTokenizer:
    """A user's ``--tokenizer``, read and checked before any work: what phase 1 stores."""

    kind: str  # SENTENCEPIECE | HUGGINGFACE
    source: str  # the path the user gave
    files: dict[str, bytes]  # SentencePiece: {SP_MODEL_FILE: model}; Hugging Face: HF_FILES found
    vocab_size: int
    hf_class: str | None = None  # the transformers class that loads the files

    @property
    def sha256(self) -> str:
        """The manifest's (and the settings') tokenizer hash."""
        if self.kind == SENTENCEPIECE:
            return hashlib.sha256(self.files[SP_MODEL_FILE]).hexdigest()
        return files_sha256(file_hashes(self.files))


def file_hashes(files: dict[str, bytes]) -> dict[str, str]:
    """{name: sha256} of files held in memory, by name."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}


def files_sha256(hashes: dict[str, str]) -> str:
    """One sha256 for a set of files: over ``sha256sum``'s lines for them, by name, so that
    ``cd DATA_DIR/tokenizer && LC_ALL=C sha256sum * | sha256sum`` gives it too."""
    lines = "".join(f"{sha}  {name}\n" for name, sha in sorted(hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def read_given_tokenizer(path: str) -> GivenTokenizer:
    """``--tokenizer PATH``: a SentencePiece model file, or a directory holding a Hugging
    Face fast tokenizer; read and checked for the special tokens."""
    if os.path.isdir(path):
        return load_hf_tokenizer_dir(path)
    if not os.path.isfile(path):
        raise DataPrepError(
            f"{path}: no such tokenizer (give a SentencePiece model file or a Hugging Face "
            "tokenizer directory)"
        )
    with open(path, "rb") as f:
        data = f.read()
    sp = open_model(data, path)
    special_ids(sp, path)
    return GivenTokenizer(SENTENCEPIECE, path, {SP_MODEL_FILE: data}, sp.get_piece_size())


def load_hf_tokenizer_dir(path: str) -> GivenTokenizer:
    """A Hugging Face tokenizer directory, loaded offline as ``AutoTokenizer`` loads it, and
    checked: a fast tokenizer with the five special tokens, which its tokenizer files alone
    (the ones copied into DATA_DIR) load again token for token."""
    names = [n for n in HF_FILES if os.path.isfile(os.path.join(path, n))]
    if "tokenizer.json" not in names and "vocab.txt" not in names:
        model = os.path.join(path, SP_MODEL_FILE)
        hint = (
            f"; a SentencePiece model is given as its file, --tokenizer {model}"
            if os.path.isfile(model)
            else ""
        )
        raise DataPrepError(
            f"{path}: holds no Hugging Face tokenizer (no tokenizer.json or vocab.txt){hint}"
        )
    files = {}
    for name in names:
        with open(os.path.join(path, name), "rb") as f:
            files[name] = f.read()
    from transformers import AutoTokenizer

    hint = (
        ""
        if "tokenizer.json" in names
        else "; a vocab.txt without tokenizer.json needs its tokenizer_class named in "
        "tokenizer_config.json, or the model's config.json beside it"
    )
    load = functools.partial(AutoTokenizer.from_pretrained, path, local_files_only=True)
    original = HuggingFaceTokenizer(_load_hf(load, path, hint), path)
    if not original.tokenizer.is_fast:
        raise DataPrepError(
            f"{path}: {type(original.tokenizer).__name__} is a slow (Python) tokenizer; "
            "data_prep needs a fast one (a directory with its tokenizer.json)"
        )
    special = original.special_ids()
    hf_class = type(original.tokenizer).__name__
    with tempfile.TemporaryDirectory() as alone:
        for name, data in files.items():
            with open(os.path.join(alone, name), "wb") as f:
                f.write(data)
        copy = HuggingFaceTokenizer(_load_hf_class(alone, hf_class, path), path)
        if copy.vocabulary() != original.vocabulary() or copy.special_ids() != special:
            raise DataPrepError(
                f"{path}: its tokenizer files alone ({', '.join(names)}) load as another "
                "tokenizer than the directory does; data_prep copies only those files"
            )
    return GivenTokenizer(HUGGINGFACE, path, files, original.vocab_size, hf_class)


def _load_hf(load, where: str, hint: str = ""):
    """``load()``, with whatever transformers raises for a bad tokenizer as one line."""
    try:
        return load()
    except Exception as e:  # OSError, ValueError, JSON and tokenizers errors alike
        message = " ".join(str(e).split())
        message = message if len(message) <= 200 else message[:200] + "..."
        raise DataPrepError(
            f"{where}: the Hugging Face tokenizer does not load "
            f"({type(e).__name__}: {message}){hint}"
        ) from None


def _load_hf_class(path: str, hf_class: str, where: str):
    """The tokenizer in ``path`` through its class: a directory of tokenizer files alone
    has no ``config.json`` from which ``AutoTokenizer`` could tell the class."""
    import transformers

    cls = getattr(transformers, hf_class, None)
    if cls is None:
        raise DataPrepError(f"{where}: tokenizer class {hf_class} is not in transformers")
    return _load_hf(functools.partial(cls.from_pretrained, path, local_files_only=True), where)


# -- the data's tokenizer --------------------------------------------------------------------


class SentencePieceTokenizer:
    """A SentencePiece model, as data_prep encodes with it."""

    kind = SENTENCEPIECE

    def __init__(self, sp, source: str):
        self.sp, self.source = sp, source

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def special_ids(self) -> dict[str, int]:
        return special_ids(self.sp, self.source)

    def ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return self.sp.id_to_piece([int(i) for i in ids])

    def vocabulary(self) -> list[str]:
        return self.ids_to_tokens(range(self.vocab_size))

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` as data_prep writes them (no special tokens)."""
        return self.sp.encode(text)

    def encode_documents(self, docs: list[bytes]) -> list[np.ndarray]:
        """Each document's ids, int32 arrays; one thread (workers are processes)."""
        return self.sp.encode(docs, out_type="numpy", num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer:
    """A transformers fast tokenizer, as data_prep encodes with it."""

    kind = HUGGINGFACE

    def __init__(self, tokenizer, source: str):
        self.tokenizer, self.source = tokenizer, source

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def special_ids(self) -> dict[str, int]:
        """The tokenizer's own pad/unk/cls/sep/mask ids, or a clear error."""
        ids, missing = {}, []
        for name in SPECIAL_PIECES:
            token = getattr(self.tokenizer, f"{name}_token")
            ids[name] = getattr(self.tokenizer, f"{name}_token_id")
            # a token outside the vocabulary gets the unknown token's id
            if token is None or self.tokenizer.convert_ids_to_tokens(ids[name]) != str(token):
                missing.append(f"{name}_token")
        if missing:
            raise DataPrepError(
                f"{self.source}: the tokenizer lacks {', '.join(missing)}; data_prep needs its "
                "pad, unk, cls, sep and mask tokens ([PAD] [UNK] [CLS] [SEP] [MASK] in BERT)"
            )
        if len(set(ids.values())) != len(ids):
            raise DataPrepError(f"{self.source}: special tokens share ids: {ids}")
        return ids

    def ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])

    def vocabulary(self) -> list[str]:
        return self.ids_to_tokens(range(self.vocab_size))

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` as data_prep writes them (no special tokens)."""
        return self.encode_documents([text.encode()])[0].tolist()

    def encode_documents(self, docs: list[bytes]) -> list[np.ndarray]:
        """Each document's ids, int32 arrays, in one batched call: whole documents (no
        truncation, whatever the tokenizer's maximum length), special tokens in the text
        encoded as text."""
        encoded = self.tokenizer(
            [d.decode() for d in docs],
            add_special_tokens=False,
            split_special_tokens=True,
            truncation=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,  # no warning about documents longer than the model's positions
        )["input_ids"]
        return [np.asarray(ids, np.int32) for ids in encoded]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def open_tokenizer(data_dir: str, section: dict) -> SentencePieceTokenizer | HuggingFaceTokenizer:
    """The tokenizer a manifest's ``tokenizer`` section describes, in ``data_dir``; its
    files are checked against the section's hashes. Manifests without ``kind`` are
    sentencepiece."""
    kind = section.get("kind", SENTENCEPIECE)
    if kind == SENTENCEPIECE:
        path = os.path.join(data_dir, section["file"])
        files = _read_stored(data_dir, {section["file"]: section["sha256"]})
        return SentencePieceTokenizer(open_model(files[section["file"]], path), path)
    if kind == HUGGINGFACE:
        path = os.path.join(data_dir, section["dir"])
        _read_stored(path, section["files"])
        return HuggingFaceTokenizer(_load_hf_class(path, section["class"], path), path)
    raise DataPrepError(f"{data_dir}: tokenizer kind {kind!r} is unknown to this code")


def _read_stored(folder: str, hashes: dict[str, str]) -> dict[str, bytes]:
    files = {}
    for name in hashes:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                files[name] = f.read()
        except OSError as e:
            raise DataPrepError(f"{os.path.join(folder, name)}: cannot read ({e})") from None
    if file_hashes(files) != dict(sorted(hashes.items())):
        raise DataPrepError(
            f"{folder}: the tokenizer is not the one this data was encoded with (its sha256 "
            "differs from manifest.json's); restore the original file or run data_prep again"
        )
    return files


def open_data_tokenizer(data_dir: str) -> SentencePieceTokenizer | HuggingFaceTokenizer:
    """DATA_DIR's tokenizer, whichever its kind: ``ids_to_tokens``, ``vocabulary``,
    ``encode`` (text to ids without special tokens, as the shards hold them), ``decode``,
    ``special_ids``. Raises DataPrepError."""
    manifest = load_manifest(data_dir)
    return open_tokenizer(manifest.data_dir, manifest.raw["tokenizer"])


def data_vocabulary(data_dir: str) -> list[str]:
    """The token string of every id of DATA_DIR's vocabulary, 0..vocab_size-1:
    SentencePiece pieces, or the Hugging Face tokenizer's tokens."""
    return open_data_tokenizer(data_dir).vocabulary()
