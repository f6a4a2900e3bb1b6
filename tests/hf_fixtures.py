"""Small Hugging Face tokenizers and BERTs for the tests, made offline in seconds: the
stand-ins for a local copy of bert-base-uncased (helpers, not pytest fixtures)."""

from __future__ import annotations

import os
import shutil

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_wordpiece_tokenizer(out_dir, texts: list[str], vocab_size: int = 400) -> str:
    """A lowercasing BERT WordPiece tokenizer trained on ``texts`` ([PAD]=0, [UNK]=1,
    [CLS]=2, [SEP]=3, [MASK]=4), saved as ``BertTokenizerFast`` saves it, with a
    ``vocab.txt`` beside, as in a bert-base-uncased directory. Returns ``out_dir``.

    ``vocab_size`` is an upper bound: training stops when every word of ``texts`` is one
    token (corpus.documents' word list supports about 280)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=SPECIALS)
    wordpiece.save_model(out_dir)  # vocab.txt
    tokens = dict(zip(("pad", "unk", "cls", "sep", "mask"), SPECIALS))
    tokenizer = BertTokenizerFast(
        tokenizer_object=wordpiece._tokenizer,
        do_lower_case=True,
        **{f"{name}_token": token for name, token in tokens.items()},
    )
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_hf_bert(
    out_dir,
    tokenizer_dir,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 64,
    seed: int = 0,
    kind: str = "BertForMaskedLM",
) -> str:
    """A randomly initialised (``torch.manual_seed(seed)``) ``BertForMaskedLM`` (or
    ``BertForPreTraining``) over the tokenizer's vocabulary, saved with ``save_pretrained``
    and the tokenizer's files copied in. Returns ``out_dir``."""
    import torch
    import transformers

    assert kind in ("BertForMaskedLM", "BertForPreTraining"), kind
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(tokenizer_dir), local_files_only=True
    )
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = getattr(transformers, kind)(config)
    out_dir = str(out_dir)
    model.save_pretrained(out_dir)
    for name in os.listdir(tokenizer_dir):
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
    return out_dir
