"""Phase 1: the tokenizer, trained on a bounded, seeded sample, or brought by the user.

Special tokens are SentencePiece control symbols, so they never come out of encoding
text (a literal "[MASK]" in the corpus is ordinary text). A trained model has
[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4; a user's model may place them anywhere,
which is why every consumer reads the ids from the manifest.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterator

from data_prep.errors import DataPrepError
from data_prep.sources import Source, Utf8Counter, iter_documents, plan_units

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


def load_tokenizer_file(path: str):
    """The bytes of a user's ``--tokenizer`` model and its ``SentencePieceProcessor``,
    checked for the special tokens."""
    if not os.path.isfile(path):
        raise DataPrepError(f"{path}: no such tokenizer file")
    with open(path, "rb") as f:
        data = f.read()
    sp = open_model(data, path)
    special_ids(sp, path)
    return data, sp
