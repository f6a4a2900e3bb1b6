"""The Hugging Face fast tokenizer against data_prep's SentencePiece encoding.

Agreement is measured on held-out documents (never in the tokenizer's training text)
against the ids data_prep itself wrote to the shards: the tokenizer is trained on one
corpus (``--phase tokenizer``), then data_prep encodes the held-out corpus with it
(``--tokenizer``), and the documents are read back from the shards.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import subprocess
import sys
import unicodedata

# huggingface_hub reads this once, at import: set before transformers comes in (nothing
# here should reach the network; the AutoTokenizer test's subprocess sets it too)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import sentencepiece as spm  # noqa: E402
from corpus import WORDS, write_txt  # noqa: E402

from data_prep.cli import main as data_prep  # noqa: E402
from data_prep.manifest import load_manifest, open_shard  # noqa: E402
from pretrain.hf_tokenizer import (  # noqa: E402
    TokenizerConversionError,
    build_fast_tokenizer,
    save_tokenizer,
)

MAX_LEN = 512  # stands for the model's max_position_embeddings
MIN_AGREEMENT = 0.999
HELD_OUT_DOCS = 4000

# -- corpora -------------------------------------------------------------------


def words(*lines: str) -> list[str]:
    return [word for line in lines for word in line.split()]


FOREIGN = words(
    "café naïve Zürich Ångström São Paulo façade jalapeño Øresund Москва язык",
    "Αθήνα λόγος ὁδὸς ᾠδή Ἀθῆναι مرحبا שלום हिन्दी ภาษาไทย",
    "東京 日本語 北京大学 自然言語処理 がっこう ぱん ですが 한국어 서울 가나다 학교",
    "Tiếng Việt người được những Hà Nội phở trường đại học ở ấy thủ đô",
    "ﬁnance ＡＢＣ１２３ Ｔｏｋｙｏ ½ x² ™ … “quoted” ‘single’ — «guillemets»",
    "🙂 🚀 👍🏽 ❤️ 3.14 1,000 2024-01-01 user@example.com C++ <b> #tag $5 100%",
    "e\u0301te\u0301 👨\u200d👩\u200d👧",  # a decomposed é, a ZWJ sequence
)
SYLLABLES = words("ka to ri mon ste lar qui ben dor ä ü é ña ção ßen zy ph tion ing al")
SPACES = [" "] * 6 + ["  ", "   ", "\t", " \t ", "\u00a0", "\u3000", "\u2009", "\n", " \n ", "\r\n"]
PUNCT = list(".,!?;:")
# only in held-out text: characters the tokenizer never saw (-> [UNK] or bytes), unusual
# whitespace and control characters, compatibility forms NFKC rewrites, decomposed text
UNSEEN = [
    *words("鑫 龘 🦜 🧬 Ⅻ ㎏ ｶﾀｶﾅ ！？ Ǆ ﬀ ① ⁵ ℃ ſ İstanbul ΣΊΣΥΦΟΣ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ⓐ"),
    *["aaaaaaaaaa", "!!!!!", "....", "\t\t", "\n\n", " \u3000 ", "\u00a0\u00a0", "\r\n\r\n"],
    *["\u200b", "\ufeff", "\u00ad", "\x07", "\u2028", "\u0085", "\u200a", "\u202f", "\u205f"],
    *["\u1100\u1161", "a\u0308", "x\u0301\u0302\u0303", "\U0010ffff", "\ue000", "🏳️\u200d🌈"],
]


def multilingual_documents(n: int, seed: int) -> list[str]:
    """English, pseudo-words, many scripts, emoji, mixed whitespace and newlines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        out = []
        for i in range(rng.randint(5, 80)):
            r = rng.random()
            if r < 0.2:
                word = rng.choice(FOREIGN)
            elif r < 0.45:
                word = "".join(rng.choices(SYLLABLES, k=rng.randint(1, 4)))
            else:
                word = rng.choice(WORDS)
            if i:
                out.append(rng.choice(SPACES) if rng.random() < 0.3 else " ")
            out.append(word.capitalize() if rng.random() < 0.1 else word)
            if rng.random() < 0.08:
                out.append(rng.choice(PUNCT))
        docs.append("".join(out).strip())
    return docs


def held_out_documents(n: int, seed: int) -> list[str]:
    """Documents of another seed, half with unseen pieces, a tenth in NFD; stripped, as
    data_prep reads documents."""
    rng = random.Random(seed)
    docs = []
    for doc in multilingual_documents(n, seed):
        if rng.random() < 0.5:
            parts = doc.split(" ")
            for _ in range(rng.randint(1, 4)):
                parts.insert(rng.randrange(len(parts) + 1), rng.choice(UNSEEN))
            doc = ("" if rng.random() < 0.1 else " ").join(parts)
        if rng.random() < 0.1:
            doc = unicodedata.normalize("NFD", doc)
        docs.append(doc.strip())
    return [d for d in docs if d]


def shard_documents(data_dir: str) -> list[list[int]]:
    """Each document's ids as data_prep wrote them: rows are [CLS] + stream, documents
    end with [SEP], only the last row is padded."""
    m = load_manifest(data_dir)
    rows = np.concatenate([open_shard(p, m.seq_len) for p in m.shard_paths("train")])
    assert (rows[:, 0] == m.special.cls).all()
    stream = rows[:, 1:].reshape(-1)
    stream = stream[stream != m.special.pad].tolist()
    docs, start = [], 0
    for end in np.flatnonzero(np.asarray(stream) == m.special.sep):
        docs.append(stream[start:end])
        start = end + 1
    assert start == len(stream)
    return docs


# -- DATA_DIRs -------------------------------------------------------------------

CONFIGS = {
    "unigram": ["--model-type", "unigram"],
    "bpe": ["--model-type", "bpe"],
    "unigram-byte-fallback": ["--model-type", "unigram", "--byte-fallback"],
    "bpe-byte-fallback": ["--model-type", "bpe", "--byte-fallback"],
}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf_corpora")
    write_txt(root / "train.txt", multilingual_documents(3000, seed=1))
    held_out = held_out_documents(HELD_OUT_DOCS, seed=2)
    with open(root / "held_out.jsonl", "w") as f:
        f.writelines(json.dumps({"text": doc}) + "\n" for doc in held_out)
    return {"train": root / "train.txt", "held_out": root / "held_out.jsonl", "docs": held_out}


def run_data_prep(*args) -> None:
    assert data_prep([*map(str, args), "--workers", "1", "--seq-len", "64"]) == 0


@pytest.fixture(scope="module", params=list(CONFIGS))
def held_out_dir(request, corpora, tmp_path_factory) -> str:
    """DATA_DIR of the held-out corpus, encoded by data_prep with a tokenizer trained on
    the training corpus only."""
    root = tmp_path_factory.mktemp(request.param)
    run_data_prep(
        "--input", corpora["train"], "--output", root / "tok", "--vocab-size", "1000",
        "--phase", "tokenizer", "--character-coverage", "0.9995", *CONFIGS[request.param],
    )  # fmt: skip
    run_data_prep(
        "--input", corpora["held_out"], "--output", root / "data",
        "--tokenizer", root / "tok" / "tokenizer.model", "--valid-fraction", "0",
    )  # fmt: skip
    return str(root / "data")


@pytest.fixture(scope="module")
def train_dir(corpora, tmp_path_factory) -> str:
    """A unigram DATA_DIR of the training corpus (special ids 0..4)."""
    out = tmp_path_factory.mktemp("hf_data") / "data"
    run_data_prep("--input", corpora["train"], "--output", out, "--vocab-size", "1000")
    return str(out)


@pytest.fixture(scope="module")
def moved_ids_dir(corpora, tmp_path_factory) -> str:
    """A DATA_DIR whose user-supplied tokenizer has the special tokens at other ids."""
    root = tmp_path_factory.mktemp("hf_moved")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpora["docs"][:500]),
        model_writer=model,
        vocab_size=400,
        unk_id=0,
        unk_piece="[UNK]",
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        control_symbols=["[SEP]", "[MASK]", "[PAD]", "[CLS]"],
        minloglevel=2,
    )
    (root / "moved.model").write_bytes(model.getvalue())
    out = root / "data"
    run_data_prep("--input", corpora["train"], "--output", out, "--tokenizer", root / "moved.model")
    return str(out)


# -- agreement with data_prep ------------------------------------------------------


def test_agrees_with_data_prep_on_held_out_text(held_out_dir, corpora):
    docs = corpora["docs"]
    # the sample holds what it claims to
    assert sum(not d.isascii() for d in docs) > 0.5 * len(docs)
    for what in ("\t", "  ", "\n", "\u3000", "東京", "🙂", "\u1100\u1161"):
        assert sum(what in d for d in docs) >= 20, what
    assert sum(not unicodedata.is_normalized("NFC", d) for d in docs) >= 200

    expected = shard_documents(held_out_dir)
    sp = spm.SentencePieceProcessor(model_file=load_manifest(held_out_dir).tokenizer_path)
    assert expected == [sp.encode(d) for d in docs]  # the shards are sp.encode(document)
    fast = build_fast_tokenizer(held_out_dir, MAX_LEN)
    got = fast(docs, add_special_tokens=False)["input_ids"]
    mismatches = [(d, e, g) for d, e, g in zip(docs, expected, got) if e != g]
    rate = 1 - len(mismatches) / len(docs)
    name = os.path.basename(os.path.dirname(held_out_dir))
    print(f"\n{name}: agreement {rate:.4%} ({len(docs) - len(mismatches)}/{len(docs)} documents)")
    for doc, e, g in mismatches[:3]:
        i = next(k for k, (a, b) in enumerate(zip([*e, None], [*g, None])) if a != b)
        print(f"  {doc[:60]!r}...: from token {i}, data_prep {e[i : i + 4]} fast {g[i : i + 4]}")
    assert rate >= MIN_AGREEMENT


def test_literal_special_token_text_gives_the_special_id(train_dir):
    """The one deliberate difference: "[MASK]" (etc.) written in text is that special
    token (HF convention, needed by fill-mask); SentencePiece encodes it as characters."""
    m = load_manifest(train_dir)
    fast = build_fast_tokenizer(train_dir, MAX_LEN)
    sp = spm.SentencePieceProcessor(model_file=m.tokenizer_path)
    before, after = "the model", "of the data"
    for piece, special_id in zip(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], m.special.all):
        text = f"{before} {piece} {after}"
        as_special = sp.encode(before) + [special_id] + sp.encode(after)
        assert fast(text, add_special_tokens=False)["input_ids"] == as_special, piece
        assert sp.encode(text) != as_special, piece  # SentencePiece spells it out


# -- special tokens and BERT's template ------------------------------------------------


@pytest.fixture(params=["train_dir", "moved_ids_dir"])
def any_data_dir(request) -> str:
    return request.getfixturevalue(request.param)


def test_special_tokens_at_manifest_ids(any_data_dir):
    special = dataclasses.asdict(load_manifest(any_data_dir).special)  # {"pad": 0, ...}
    fast = build_fast_tokenizer(any_data_dir, MAX_LEN)
    assert {name: getattr(fast, f"{name}_token_id") for name in special} == special
    pieces = [f"[{name.upper()}]" for name in special]
    assert fast.convert_tokens_to_ids(pieces) == list(special.values())
    assert fast("☃", add_special_tokens=False)["input_ids"][-1] == special["unk"]  # in no corpus


def test_pair_template_padding_and_truncation(any_data_dir):
    m = load_manifest(any_data_dir)
    s = m.special
    fast = build_fast_tokenizer(any_data_dir, MAX_LEN)
    sp = spm.SentencePieceProcessor(model_file=m.tokenizer_path)
    a, b = "the model was trained", "Zürich 東京 🙂 café"
    assert fast.is_fast
    assert fast.model_input_names == ["input_ids", "token_type_ids", "attention_mask"]
    assert fast.model_max_length == MAX_LEN and fast.padding_side == "right"

    single = fast(a)
    assert single["input_ids"] == [s.cls, *sp.encode(a), s.sep]
    assert single["token_type_ids"] == [0] * len(single["input_ids"])

    pair = fast(a, b)
    ids_a, ids_b = sp.encode(a), sp.encode(b)
    assert pair["input_ids"] == [s.cls, *ids_a, s.sep, *ids_b, s.sep]
    assert pair["token_type_ids"] == [0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)
    assert pair["attention_mask"] == [1] * len(pair["input_ids"])

    batch = fast([a, a + " " + a], padding="max_length", max_length=32)
    n = len(ids_a) + 2
    assert batch["input_ids"][0] == [s.cls, *ids_a, s.sep] + [s.pad] * (32 - n)
    assert batch["attention_mask"][0] == [1] * n + [0] * (32 - n)
    assert batch["attention_mask"][1][: 2 * len(ids_a) + 2] == [1] * (2 * len(ids_a) + 2)

    long = fast(" ".join(["model"] * 2000), truncation=True)["input_ids"]
    assert len(long) == MAX_LEN and long[0] == s.cls and long[-1] == s.sep


def test_decode_round_trips(held_out_dir, corpora):
    m = load_manifest(held_out_dir)
    fast = build_fast_tokenizer(held_out_dir, MAX_LEN)
    sp = spm.SentencePieceProcessor(model_file=m.tokenizer_path)
    text = "The model was trained on Zürich 東京 data 🙂, twice."
    assert fast.decode(fast(text)["input_ids"], skip_special_tokens=True) == text
    assert fast.decode(fast(text)["input_ids"]) == f"[CLS] {text}[SEP]"
    # without [UNK] (which SentencePiece decodes as " ⁇ "), the texts are SentencePiece's
    docs = [ids for ids in shard_documents(held_out_dir) if m.special.unk not in ids]
    assert len(docs) > 1000
    assert fast.batch_decode(docs) == [sp.decode(ids) for ids in docs]


# -- save and load --------------------------------------------------------------------

LOAD_SCRIPT = """
import json, sys
sys.modules["sentencepiece"] = None  # importing it fails: the fast tokenizer needs none
from transformers import AutoTokenizer
texts = json.loads(sys.argv[1])
for directory in sys.argv[2:]:
    tok = AutoTokenizer.from_pretrained(directory)
    print(json.dumps({
        "class": type(tok).__name__,
        "is_fast": tok.is_fast,
        "model_max_length": tok.model_max_length,
        "mask_token_id": tok.mask_token_id,
        "single": tok(texts)["input_ids"],
        "pair": tok(texts, texts[::-1])["input_ids"],
    }))
"""


def test_save_and_load_offline_with_auto_tokenizer(train_dir, corpora, tmp_path):
    from transformers import BertConfig

    alone, with_config = tmp_path / "alone", tmp_path / "with_config"
    save_tokenizer(train_dir, str(alone), MAX_LEN)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(alone))
    # as exported next to the model's config.json, whose model_type "bert" AutoTokenizer
    # consults too
    save_tokenizer(train_dir, str(with_config), MAX_LEN)
    BertConfig(vocab_size=1000).save_pretrained(with_config)

    texts = corpora["docs"][:50] + ["Paris is the [MASK] of France."]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home")}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, json.dumps(texts), str(alone), str(with_config)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    fast = build_fast_tokenizer(train_dir, MAX_LEN)
    loaded = [json.loads(line) for line in result.stdout.splitlines()[-2:]]
    for tok in loaded:
        assert tok["class"] == "TokenizersBackend" and tok["is_fast"]  # transformers 5's fast
        assert tok["model_max_length"] == MAX_LEN
        assert tok["mask_token_id"] == load_manifest(train_dir).special.mask
        assert tok["single"] == fast(texts)["input_ids"]
        assert tok["pair"] == fast(texts, texts[::-1])["input_ids"]


# -- refusals ---------------------------------------------------------------------------


def copy_data_dir(src: str, dst) -> str:
    """A DATA_DIR sharing ``src``'s shards, with its own manifest and tokenizer files."""
    os.makedirs(dst)
    for name in os.listdir(src):
        target = os.path.join(src, name)
        if name in ("manifest.json", "tokenizer.model"):
            with open(target, "rb") as f:
                (dst / name).write_bytes(f.read())
        else:
            os.symlink(target, dst / name)
    return str(dst)


def test_refuses_a_tokenizer_that_is_not_the_manifests(train_dir, tmp_path):
    other = copy_data_dir(train_dir, tmp_path / "data")
    with open(os.path.join(other, "tokenizer.model"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(TokenizerConversionError, match="sha256 differs"):
        build_fast_tokenizer(other, MAX_LEN)


def test_refuses_normalisation_it_cannot_reproduce(train_dir, tmp_path):
    import hashlib

    from transformers.convert_slow_tokenizer import import_protobuf

    other = copy_data_dir(train_dir, tmp_path / "data")
    path = os.path.join(other, "tokenizer.model")
    proto = import_protobuf().ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    proto.normalizer_spec.add_dummy_prefix = False
    data = proto.SerializeToString()
    with open(path, "wb") as f:
        f.write(data)
    manifest_path = os.path.join(other, "manifest.json")
    with open(manifest_path) as f:
        raw = json.load(f)
    raw["tokenizer"]["sha256"] = hashlib.sha256(data).hexdigest()
    with open(manifest_path, "w") as f:
        json.dump(raw, f)
    with pytest.raises(TokenizerConversionError, match="add_dummy_prefix"):
        build_fast_tokenizer(other, MAX_LEN)
