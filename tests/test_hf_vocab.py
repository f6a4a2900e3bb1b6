"""data_prep --tokenizer with a Hugging Face tokenizer directory: the data is that
tokenizer's own encoding, recorded and fingerprinted by its files, and the export hands
the same files back."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from types import SimpleNamespace

# huggingface_hub reads this once, at import: set before transformers comes in
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from corpus import WORDS, documents, write_txt  # noqa: E402
from hf_fixtures import make_hf_bert, make_wordpiece_tokenizer  # noqa: E402

from data_prep.cli import main as data_prep  # noqa: E402
from data_prep.encode import valid_flags  # noqa: E402
from data_prep.errors import DataPrepError  # noqa: E402
from data_prep.manifest import load_manifest, open_shard  # noqa: E402
from data_prep.tokenizer import data_vocabulary, open_data_tokenizer  # noqa: E402

SEQ_LEN = 32
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]
# a literal special token in the corpus is text, as in SentencePiece data
SPECIALS_AS_TEXT = "The [MASK] of the [SEP] model and [CLS] token, not [PAD] special."


def prep(inputs, out, *extra) -> int:
    return data_prep(
        ["--input", *map(str, inputs), "--output", str(out), "--seq-len", str(SEQ_LEN),
         "--valid-fraction", "0.1", "--seed", "3", *map(str, extra)]
    )  # fmt: skip


def hf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_vocab")


@pytest.fixture(scope="module")
def corpus(root) -> list[str]:
    """Documents as data_prep reads them back: the test corpus, one document far longer
    than the tokenizer's model_max_length, and one with special tokens as text."""
    long_doc = " ".join(WORDS[i % len(WORDS)] for i in range(400)) + "."
    docs = [*documents(500, seed=41), long_doc, SPECIALS_AS_TEXT, *documents(100, seed=42)]
    write_txt(root / "corpus.txt", docs)
    return docs


@pytest.fixture(scope="module")
def bert(root) -> str:
    """A BERT directory (weights, config and tokenizer), its tokenizer's maximum length its
    positions, as in a bert-base-uncased copy."""
    tokenizer = make_wordpiece_tokenizer(root / "tok", documents(800, seed=31), 400)
    path = make_hf_bert(root / "bert", tokenizer, max_position_embeddings=64)
    config_path = os.path.join(path, "tokenizer_config.json")
    config = json.load(open(config_path))
    config["model_max_length"] = 64
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return path


@pytest.fixture(scope="module")
def data(root, corpus, bert) -> str:
    assert prep([root / "corpus.txt"], root / "data", "--tokenizer", bert, "--workers", 2) == 0
    return str(root / "data")


def split_documents(data_dir, split) -> list[list[int]]:
    """The documents of a split as the shards hold them: rows of [CLS] ..., [SEP] after
    each document, padding only at the end."""
    m = load_manifest(data_dir)
    rows = np.concatenate([open_shard(p, m.seq_len) for p in m.shard_paths(split)])
    assert (rows[:, 0] == m.special.cls).all()
    stream = rows[:, 1:].reshape(-1)
    pads = np.flatnonzero(stream == m.special.pad)
    assert len(pads) == 0 or (pads == np.arange(pads[0], len(stream))).all()
    stream = stream[: pads[0]] if len(pads) else stream
    docs, start = [], 0
    for end in np.flatnonzero(stream == m.special.sep):
        docs.append(stream[start:end].tolist())
        start = end + 1
    assert start == len(stream), "the stream ends with [SEP]"
    return docs


def test_the_manifest_records_the_tokenizer_and_its_files(data, bert):
    raw = load_manifest(data).raw
    section = raw["tokenizer"]
    stored = os.path.join(data, "tokenizer")
    assert sorted(os.listdir(stored)) == TOKENIZER_FILES, "no weights, no config.json"
    hashes = {n: hashlib.sha256(read(os.path.join(bert, n))).hexdigest() for n in TOKENIZER_FILES}
    assert all(read(os.path.join(stored, n)) == read(os.path.join(bert, n)) for n in hashes)
    lines = "".join(f"{hashes[n]}  {n}\n" for n in sorted(hashes))  # sha256sum's
    assert section == {
        "kind": "huggingface",
        "dir": "tokenizer",
        "class": "BertTokenizer",
        "files": hashes,
        "sha256": hashlib.sha256(lines.encode()).hexdigest(),
        "trained": False,
        "source": bert,
    }
    assert raw["settings"]["tokenizer"] == section["sha256"]
    tokenizer = hf_tokenizer(bert)
    assert raw["vocab_size"] == len(tokenizer) and raw["dtype"] == "uint16"
    names = ("pad", "unk", "cls", "sep", "mask")
    assert raw["special_ids"] == {n: getattr(tokenizer, f"{n}_token_id") for n in names}


def test_every_row_is_the_tokenizers_own_encoding_of_the_documents(data, corpus, bert):
    tokenizer = hf_tokenizer(bert)
    encoded = tokenizer(corpus, add_special_tokens=False, verbose=False)["input_ids"]
    # the long document is encoded whole, past the tokenizer's model_max_length (64)
    assert len(encoded[500]) > 5 * tokenizer.model_max_length
    # special tokens in the text are text: no [MASK], no document boundary inside
    as_text = tokenizer(SPECIALS_AS_TEXT, add_special_tokens=False, split_special_tokens=True)
    special = load_manifest(data).special
    specials = {special.pad, special.cls, special.sep, special.mask}  # "[" is [UNK]
    assert not specials & set(as_text["input_ids"]) and encoded[501] != as_text["input_ids"]
    encoded[501] = as_text["input_ids"]

    valid = valid_flags([d.encode() for d in corpus], seed=3, valid_fraction=0.1)
    assert 0 < valid.sum() < len(corpus) - 1
    assert split_documents(data, "train") == [ids for ids, v in zip(encoded, valid) if not v]
    assert split_documents(data, "valid") == [ids for ids, v in zip(encoded, valid) if v]
    ours = open_data_tokenizer(data)
    assert [ours.encode(doc) for doc in corpus[498:503]] == encoded[498:503]


def test_a_vocab_txt_directory_like_bert_base_uncased(root, bert, tmp_path):
    """vocab.txt, a tokenizer_config.json that names no class, the model's config.json:
    the class comes from config.json, which stays behind; the data keeps the class."""
    source = tmp_path / "bert-base-like"
    source.mkdir()
    for name in ("vocab.txt", "config.json"):
        shutil.copyfile(os.path.join(bert, name), source / name)
    (source / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    small = tmp_path / "small.txt"
    docs = documents(60, seed=45)
    write_txt(small, docs)
    out = tmp_path / "data"
    assert prep([small], out, "--tokenizer", source, "--workers", 1, "--valid-fraction", 0) == 0
    section = load_manifest(out).raw["tokenizer"]
    assert section["class"] == "BertTokenizer"
    assert sorted(section["files"]) == sorted(os.listdir(out / "tokenizer"))
    assert sorted(section["files"]) == ["tokenizer_config.json", "vocab.txt"]
    tokenizer = hf_tokenizer(source)
    assert split_documents(out, "train") == tokenizer(docs, add_special_tokens=False)["input_ids"]
    assert data_vocabulary(out) == data_vocabulary(root / "data")


def test_data_vocabulary_for_both_kinds(data, bert, root, corpus, tmp_path):
    tokenizer = hf_tokenizer(bert)
    assert data_vocabulary(data) == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))

    # SentencePiece data, also as manifests written before the kinds existed
    import sentencepiece as spm

    sp_data = tmp_path / "sp"
    assert prep([root / "corpus.txt"], sp_data, "--vocab-size", 120, "--workers", 1) == 0
    sp = spm.SentencePieceProcessor(model_file=str(sp_data / "tokenizer.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert data_vocabulary(sp_data) == pieces
    manifest = json.load(open(sp_data / "manifest.json"))
    assert manifest["tokenizer"].pop("kind") == "sentencepiece"
    json.dump(manifest, open(sp_data / "manifest.json", "w"))
    assert data_vocabulary(sp_data) == pieces
    assert open_data_tokenizer(sp_data).encode(corpus[0]) == sp.encode(corpus[0])

    # a tokenizer file that is not the data's is refused, by name
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    with open(copy / "tokenizer" / "vocab.txt", "a") as f:
        f.write("extra\n")
    with pytest.raises(DataPrepError, match="not the one this data was encoded with"):
        data_vocabulary(copy)


def test_inspect_decodes_with_the_tokenizer(data, capsys):
    from data_prep.inspect import main as inspect

    capsys.readouterr()
    assert inspect([data, "--samples", "1"]) == 0
    shown = capsys.readouterr().out
    assert "tokenizer/ (Hugging Face BertTokenizer" in shown and "train[0]: [CLS] " in shown


def test_reruns_are_up_to_date_and_another_tokenizer_needs_overwrite(root, bert, tmp_path, capsys):
    small = tmp_path / "small.txt"
    write_txt(small, documents(150, seed=43))
    out = tmp_path / "data"
    assert prep([small], out, "--tokenizer", bert, "--workers", 1) == 0
    before = read(out / "manifest.json")
    capsys.readouterr()
    assert prep([small], out, "--tokenizer", bert, "--workers", 1) == 0
    assert "up to date" in capsys.readouterr().err and read(out / "manifest.json") == before

    other = make_wordpiece_tokenizer(tmp_path / "other", documents(300, seed=44), 300)
    assert prep([small], out, "--tokenizer", other, "--workers", 1) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "tokenizer was" in err and "--overwrite" in err
    assert read(out / "manifest.json") == before, "nothing lost"

    assert prep([small], out, "--tokenizer", other, "--workers", 1, "--overwrite") == 0
    assert load_manifest(out).raw["tokenizer"]["source"] == other
    assert read(out / "tokenizer" / "vocab.txt") == read(os.path.join(other, "vocab.txt"))
    # back to a trained SentencePiece model: the Hugging Face files go
    assert prep([small], out, "--vocab-size", 100, "--workers", 1, "--overwrite") == 0
    assert not (out / "tokenizer").exists() and (out / "tokenizer.model").exists()


def test_the_array_job_phases_give_the_bytes_of_one_run(root, bert, data, capsys):
    out = root / "array"
    common = [root / "corpus.txt"], out, "--tokenizer", bert, "--workers", 1, "--unit-mb", 0.05
    assert prep(*common, "--phase", "encode", "--task-count", 2) == 2
    assert "run --phase tokenizer first" in capsys.readouterr().err
    assert prep(*common, "--phase", "tokenizer") == 0
    assert sorted(os.listdir(out / "tokenizer")) == TOKENIZER_FILES
    for task in range(2):
        assert prep(*common, "--phase", "encode", "--task-index", task, "--task-count", 2) == 0
    units = [f for f in os.listdir(out / ".data_prep") if f.endswith(".json") and "unit-" in f]
    assert len(units) >= 4 and not (out / "manifest.json").exists()
    assert prep(*common) == 0
    for split in ("train", "valid"):
        ours, single = (load_manifest(d).shard_paths(split) for d in (out, data))
        assert [read(p) for p in ours] == [read(p) for p in single]
    assert read(out / "token_counts.arrow") == read(os.path.join(data, "token_counts.arrow"))


def test_bad_tokenizers_are_one_line_errors_and_leave_nothing(root, bert, tmp_path, capsys):
    from tokenizers import BertWordPieceTokenizer
    from transformers import PreTrainedTokenizerFast

    empty = tmp_path / "empty"
    empty.mkdir()
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    shutil.copyfile(os.path.join(bert, "config.json"), weights_only / "config.json")
    slow = tmp_path / "slow"  # a tokenizer class with no fast version
    slow.mkdir()
    shutil.copyfile(os.path.join(bert, "vocab.txt"), slow / "vocab.txt")
    (slow / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertJapaneseTokenizer", "word_tokenizer_type": "basic"})
    )
    no_mask = tmp_path / "no_mask"
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(documents(100), 200, special_tokens=["[PAD]", "[UNK]", "[CLS]"])
    PreTrainedTokenizerFast(
        tokenizer_object=wordpiece._tokenizer, pad_token="[PAD]", unk_token="[UNK]",
        cls_token="[CLS]",
    ).save_pretrained(no_mask)  # fmt: skip
    vocab_alone = tmp_path / "vocab_alone"  # no class named, no config.json
    vocab_alone.mkdir()
    shutil.copyfile(os.path.join(bert, "vocab.txt"), vocab_alone / "vocab.txt")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": ')

    cases = [
        (tmp_path / "nowhere", (), "no such tokenizer"),
        (empty, (), "holds no Hugging Face tokenizer"),
        (weights_only, (), "holds no Hugging Face tokenizer"),
        (slow, (), "BertJapaneseTokenizer is a slow (Python) tokenizer"),
        (no_mask, (), "lacks sep_token, mask_token"),
        (vocab_alone, (), "needs its tokenizer_class named"),
        (broken, (), "does not load"),
        (bert, ("--vocab-size", 999), "does not match"),
    ]
    for i, (tokenizer, extra, fragment) in enumerate(cases):
        out = tmp_path / f"out{i}"
        capsys.readouterr()
        assert prep([root / "corpus.txt"], out, "--tokenizer", tokenizer, *extra) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("data_prep: error: "), lines
        assert fragment in lines[0] and str(tokenizer) in lines[0], lines[0]
        assert not out.exists()


def test_export_writes_the_tokenizer_files_back_byte_for_byte(data, bert, tmp_path):
    from test_train import deepspeed, train_args

    from pretrain.export import main as export
    from pretrain.report import vocabulary_of

    run = tmp_path / "run"
    deepspeed(train_args(data, run, "cpu_zero0.json", 2), ranks=1)
    out = tmp_path / "hf"
    assert export([str(run), "--output", str(out)]) == 0
    for name in TOKENIZER_FILES:
        assert read(out / name) == read(os.path.join(bert, name)), name
    vocabulary = data_vocabulary(data)
    exported = hf_tokenizer(out)
    assert exported.convert_ids_to_tokens(list(range(len(exported)))) == vocabulary
    card = (out / "README.md").read_text()
    assert "| tokenizer | Hugging Face `BertTokenizer`, the data's own files" in card
    with open(out / "importance_table.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    assert [row[1] for row in rows] == vocabulary
    config = json.load(open(run / "config.json"))
    _, pieces, special = vocabulary_of(SimpleNamespace(config=config))
    assert pieces == vocabulary and special == load_manifest(data).special.all
