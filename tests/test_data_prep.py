"""data_prep end to end: round trip, determinism, resume after SIGKILL, bad input, formats."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from corpus import documents, write_txt

from data_prep import progress
from data_prep.cli import main
from data_prep.manifest import load_manifest, open_shard
from data_prep.sources import Source, Utf8Counter, iter_documents, plan_units

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prep(tmp_path, inputs, out="data", *extra, expect=0):
    out = str(tmp_path / out)
    args = [
        "--input",
        *map(str, inputs),
        "--output",
        out,
        "--seq-len",
        "32",
        "--vocab-size",
        "200",
        "--workers",
        "1",
        *map(str, extra),
    ]
    assert main(args) == expect
    return out


def tree_bytes(data_dir):
    """{relative path: sha256} of every shard and the token counts."""
    found = {}
    for root, _, files in os.walk(data_dir):
        for f in files:
            if f.endswith(".arrow") or f == "tokenizer.model":
                path = os.path.join(root, f)
                with open(path, "rb") as fh:
                    found[os.path.relpath(path, data_dir)] = hashlib.sha256(fh.read()).hexdigest()
    return found


def decode_split(data_dir, split):
    """The documents of a split, decoded back to text from the shards."""
    m = load_manifest(data_dir)
    sp = spm.SentencePieceProcessor(model_file=m.tokenizer_path)
    stream = []
    for path in m.shard_paths(split):
        rows = open_shard(path, m.seq_len)
        assert (rows[:, 0] == m.special.cls).all()
        stream.append(rows[:, 1:].reshape(-1))
    stream = np.concatenate(stream) if stream else np.empty(0, np.int64)
    stream = stream[stream != m.special.pad]
    docs, start = [], 0
    for end in np.flatnonzero(stream == m.special.sep):
        docs.append(sp.decode(stream[start:end].tolist()))
        start = end + 1
    assert start == len(stream), "the stream must end with [SEP]"
    return docs


def normalized(text):
    return " ".join(unicodedata.normalize("NFKC", text).split())


@pytest.fixture(scope="module")
def corpus_docs():
    return documents(400, seed=1)


@pytest.fixture
def corpus_file(tmp_path, corpus_docs):
    path = tmp_path / "corpus.txt"
    write_txt(path, corpus_docs)
    return path


def test_round_trip_gives_back_the_corpus(tmp_path, corpus_file, corpus_docs):
    out = prep(tmp_path, [corpus_file], "data", "--valid-fraction", "0.1", "--shard-rows", "50")
    train, valid = decode_split(out, "train"), decode_split(out, "valid")
    assert len(valid) > 10 and len(train) > 300
    assert sorted(train + valid) == sorted(normalized(d) for d in corpus_docs)
    # each split keeps corpus order
    order = {normalized(d): i for i, d in enumerate(corpus_docs)}
    assert [order[d] for d in train] == sorted(order[d] for d in train)
    m = load_manifest(out)
    assert m.split("train")["docs"] == len(train) and m.split("valid")["docs"] == len(valid)
    assert len(m.split("train")["shards"]) > 1


def test_shards_and_manifest_are_what_readers_rely_on(tmp_path, corpus_file):
    out = prep(tmp_path, [corpus_file], "data", "--shard-rows", "64")
    raw = json.load(open(os.path.join(out, "manifest.json")))
    assert raw["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert raw["dtype"] == "uint16" and raw["seq_len"] == 32 and raw["vocab_size"] == 200
    total_rows, bincount = 0, np.zeros(200, np.int64)
    for shard in raw["splits"]["train"]["shards"]:
        path = os.path.join(out, shard["file"])
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == shard["sha256"]
        table = pa.ipc.open_file(path).read_all()  # plain pyarrow, no project code
        assert table.schema.field("input_ids").type == pa.list_(pa.uint16(), 32)
        ids = np.asarray(table.column("input_ids").combine_chunks().flatten())
        assert table.num_rows == shard["rows"] and ids.max() < 200
        assert np.count_nonzero(ids != 0) == shard["tokens"]
        total_rows += table.num_rows
        bincount += np.bincount(ids, minlength=200)
    assert total_rows == raw["splits"]["train"]["rows"]
    # every token of the train rows, [CLS] and the last row's [PAD]s included
    counts = load_manifest(out).token_counts()
    assert counts.shape == (200,) and counts.sum() == total_rows * 32
    assert np.array_equal(counts, bincount)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    with open(os.path.join(out, "tokenizer.model"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == raw["tokenizer"]["sha256"]
    assert sp.id_to_piece(4) == "[MASK]"
    assert not os.path.exists(os.path.join(out, ".data_prep")), "work files are removed"


def test_progress_in_a_log_is_plain_lines(tmp_path, corpus_file, capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # a line at every unit
    prep(tmp_path, [corpus_file])
    err = capsys.readouterr().err  # not a terminal: no bar, no carriage returns
    lines = [line for line in err.splitlines() if line.startswith("data_prep: encode ")]
    assert lines and "\r" not in err
    assert lines[-1].startswith("data_prep: encode 100% (") and "tokens/s" in lines[-1]


def test_same_inputs_give_identical_bytes_whatever_the_workers(tmp_path, corpus_docs):
    # large enough for several units, so 1 and 2 workers cut the corpus differently
    big = tmp_path / "big.txt"
    write_txt(big, documents(6000, seed=2))
    a = prep(tmp_path, [big], "a", "--workers", "1")
    b = prep(tmp_path, [big], "b", "--workers", "2")
    assert tree_bytes(a) == tree_bytes(b)
    assert len(tree_bytes(a)) >= 4


def test_rerun_of_a_finished_run_does_nothing(tmp_path, corpus_file, capsys):
    out = prep(tmp_path, [corpus_file])
    before = {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in tree_bytes(out)}
    prep(tmp_path, [corpus_file])
    assert "up to date" in capsys.readouterr().err
    assert before == {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in tree_bytes(out)}


def test_a_rerun_keeps_the_units_of_the_first_run(tmp_path):
    """Finished unit files hold the tokens of the units they were planned as: a rerun with
    other --unit-mb and --workers must pack them as such, not plan anew."""
    big = tmp_path / "big.txt"
    write_txt(big, documents(4000, seed=9))
    single = prep(tmp_path, [big], "single")
    out = str(tmp_path / "rerun")
    prep(tmp_path, [big], "rerun", "--unit-mb", "0.1", "--phase", "tokenizer")
    prep(tmp_path, [big], "rerun", "--unit-mb", "0.3", "--phase", "encode", "--task-count", "2")
    done = [f for f in os.listdir(os.path.join(out, ".data_prep")) if f.startswith("unit-")]
    assert len(done) >= 6 and not os.path.exists(os.path.join(out, "manifest.json"))
    prep(tmp_path, [big], "rerun", "--unit-mb", "0.7", "--workers", "2")
    assert tree_bytes(out) == tree_bytes(single)


def test_resume_after_sigkill_gives_the_same_bytes(tmp_path):
    big = tmp_path / "big.txt"
    write_txt(big, documents(9000, seed=3, max_words=200))  # ~6 MB: several units
    reference = prep(tmp_path, [big], "reference", "--shard-rows", "2000")

    out = str(tmp_path / "killed")
    cmd = [
        sys.executable,
        "-m",
        "data_prep",
        "--input",
        str(big),
        "--output",
        out,
        "--seq-len",
        "32",
        "--vocab-size",
        "200",
        "--workers",
        "1",
        "--shard-rows",
        "2000",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = os.path.join(out, ".data_prep")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(work) and any(
            f.endswith(".json") and f.startswith("unit-") for f in os.listdir(work)
        ):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "manifest.json"))

    done_units = sorted(
        f for f in os.listdir(work) if f.endswith(".json") and f.startswith("unit-")
    )
    # as a kill in the middle of writing a shard leaves it
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    open(os.path.join(out, "train", "shard-00000.arrow.tmp-99999"), "wb").close()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(out) == tree_bytes(reference)
    assert done_units, "some work was finished before the kill"
    assert not [f for _, _, files in os.walk(out) for f in files if ".tmp-" in f]


def test_jsonl_gz_and_parquet_inputs_give_the_same_shards_as_txt(tmp_path, corpus_docs):
    txt = tmp_path / "c.txt"
    write_txt(txt, corpus_docs)
    ref = prep(tmp_path, [txt], "txt")
    tokenizer = os.path.join(ref, "tokenizer.model")

    jsonl = tmp_path / "c.jsonl"
    with open(jsonl, "w") as f:
        for d in corpus_docs:
            f.write(json.dumps({"id": 1, "body": d}) + "\n")
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        for d in corpus_docs:
            f.write(json.dumps({"text": d}) + "\n")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": corpus_docs}), parquet, row_group_size=37)

    common = ["--seq-len", "32", "--workers", "2", "--tokenizer", tokenizer]
    for name, path, field in (("j", jsonl, "body"), ("g", gz, "text"), ("p", parquet, "content")):
        out = str(tmp_path / name)
        assert main(["--input", str(path), "--output", out, "--text-field", field, *common]) == 0
        assert tree_bytes(out) == tree_bytes(ref), name


def test_directories_and_globs(tmp_path, corpus_docs):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    write_txt(d / "a.txt", corpus_docs[:200])
    write_txt(d / "sub" / "b.txt", corpus_docs[200:])
    (d / "notes.md").write_text("ignored")
    by_dir = prep(tmp_path, [d], "dir")
    by_glob = prep(tmp_path, [str(d / "**" / "*.txt")], "glob")
    assert tree_bytes(by_dir) == tree_bytes(by_glob)
    assert len(decode_split(by_dir, "train")) + len(decode_split(by_dir, "valid")) == 400


def test_invalid_utf8_is_replaced_and_counted(tmp_path, corpus_docs):
    path = tmp_path / "bad.txt"
    with open(path, "wb") as f:
        f.write(b"caf\xe9 latte is good.\n\nabc \xff\xfe def.\n\n")
        f.write("\n\n".join(corpus_docs).encode())
    out = prep(tmp_path, [path])
    raw = json.load(open(os.path.join(out, "manifest.json")))
    assert raw["stats"]["invalid_utf8_replaced"] == 3


def test_uint32_ids_above_65535(tmp_path):
    # a word-level SentencePiece model with 70,000 pieces stands in for a large vocabulary
    words = [f"w{i}" for i in range(70_000)]
    lines = [" ".join(words[i : i + 10]) for i in range(0, len(words), 10)]
    model = tmp_path / "big.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(model)[:-6],
        model_type="word",
        vocab_size=70_005,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece="[PAD]",
        unk_piece="[UNK]",
        bos_piece="[CLS]",
        eos_piece="[SEP]",
        control_symbols=["[MASK]"],
        minloglevel=2,
        hard_vocab_limit=False,
    )
    corpus = tmp_path / "words.txt"
    corpus.write_text("\n\n".join(lines[-200:]))
    out = str(tmp_path / "u32")
    assert (
        main(
            ["--input", str(corpus), "--output", out, "--seq-len", "16", "--tokenizer", str(model)]
        )
        == 0
    )
    m = load_manifest(out)
    assert m.raw["dtype"] == "uint32" and m.vocab_size > 65535
    table = pa.ipc.open_file(m.shard_paths("train")[0]).read_all()
    assert table.schema.field("input_ids").type == pa.list_(pa.uint32(), 16)
    ids = open_shard(m.shard_paths("train")[0], 16)
    assert ids.max() > 65535
    assert sorted(decode_split(out, "train") + decode_split(out, "valid")) == sorted(lines[-200:])


def test_units_never_cut_a_document(tmp_path):
    path = tmp_path / "c.txt"
    docs = documents(300, seed=5)
    write_txt(path, docs)
    src = Source(str(path), "txt", os.path.getsize(path), 0)
    units = plan_units([src], target_bytes=2000)
    assert len(units) > 10
    found = [d for u in units for s in u.segments for d in iter_documents(s, "text", Utf8Counter())]
    assert found == [d.encode() for d in docs]
    # the last units shrink towards min_bytes, and still cover every document once
    shrinking = plan_units([src], target_bytes=8000, min_bytes=1000, workers=2)
    sizes = [u.nbytes for u in shrinking]
    assert max(sizes[-3:]) < 0.5 * max(sizes) and min(sizes[:-1]) >= 1000
    found = [
        d for u in shrinking for s in u.segments for d in iter_documents(s, "text", Utf8Counter())
    ]
    assert found == [d.encode() for d in docs]


# --- bad input: one line naming the file, non-zero exit, nothing left behind ---------------


def fails(tmp_path, capsys, inputs, *extra, out="bad"):
    target = tmp_path / out
    code = main(
        [
            "--input",
            *map(str, inputs),
            "--output",
            str(target),
            "--seq-len",
            "32",
            "--vocab-size",
            "200",
            "--workers",
            "1",
            *map(str, extra),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err and err[-1].startswith("data_prep: error: ")
    assert "Traceback" not in "\n".join(err)
    return err[-1], target


def test_binary_input(tmp_path, capsys, corpus_docs):
    path = tmp_path / "blob.txt"
    path.write_bytes(("\n\n".join(corpus_docs[:50]) + "\n\nline one\nx\x00y\n").encode())
    msg, out = fails(tmp_path, capsys, [path])
    assert f"{path}:" in msg and "binary" in msg
    assert not out.exists()
    line = ("\n\n".join(corpus_docs[:50]) + "\n\nline one\n").count("\n") + 1
    assert f"{path}:{line}:" in msg


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    msg, out = fails(tmp_path, capsys, [tmp_path / "empty.txt"])
    assert "no text" in msg and not out.exists()


def test_missing_path(tmp_path, capsys):
    msg, out = fails(tmp_path, capsys, [tmp_path / "nope.txt"])
    assert "nope.txt" in msg and "no such" in msg and not out.exists()


def test_jsonl_line_that_is_not_json(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine one"}\n{"text": "fine two"}\n{"text": broken\n')
    msg, out = fails(tmp_path, capsys, [path])
    assert f"{path}:3:" in msg and "not valid JSON" in msg and not out.exists()


def test_jsonl_line_without_the_field(tmp_path, capsys, corpus_docs):
    path = tmp_path / "c.jsonl"
    with open(path, "w") as f:
        for d in corpus_docs[:30]:
            f.write(json.dumps({"text": d}) + "\n")
        f.write(json.dumps({"body": "no text here"}) + "\n")
    msg, out = fails(tmp_path, capsys, [path])
    assert f"{path}:31:" in msg and "'text'" in msg and "--text-field" in msg
    assert not out.exists()


def test_parquet_without_the_column(tmp_path, capsys):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["some text"] * 5}), path)
    msg, out = fails(tmp_path, capsys, [path])
    assert str(path) in msg and "no column 'text'" in msg and "body" in msg
    assert not out.exists()


def test_seq_len_below_8(tmp_path, capsys, corpus_file):
    msg, out = fails(tmp_path, capsys, [corpus_file], "--seq-len", "4")
    assert "--seq-len 4" in msg and not out.exists()


def test_vocab_the_corpus_cannot_support(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("ab ab ab\n\nba ba\n")
    msg, out = fails(tmp_path, capsys, [tmp_path / "tiny.txt"], "--vocab-size", "5000")
    assert "--vocab-size 5000" in msg and not out.exists()


def test_tokenizer_without_special_tokens(tmp_path, capsys, corpus_docs, corpus_file):
    prefix = tmp_path / "plain"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_docs), model_prefix=str(prefix), vocab_size=200, minloglevel=2
    )
    msg, out = fails(tmp_path, capsys, [corpus_file], "--tokenizer", f"{prefix}.model")
    assert "plain.model" in msg and "[PAD]" in msg and "[MASK]" in msg and not out.exists()


def test_output_made_with_other_settings(tmp_path, capsys, corpus_file):
    out = prep(tmp_path, [corpus_file], "data")
    before = tree_bytes(out)
    msg, _ = fails(tmp_path, capsys, [corpus_file], "--seq-len", "64", out="data")
    assert "different settings" in msg and "seq_len" in msg and "--overwrite" in msg
    assert tree_bytes(out) == before, "nothing lost"
    assert (
        main(
            [
                "--input",
                str(corpus_file),
                "--output",
                out,
                "--seq-len",
                "64",
                "--vocab-size",
                "200",
                "--workers",
                "1",
                "--overwrite",
            ]
        )
        == 0
    )
    assert load_manifest(out).seq_len == 64


def test_error_midway_leaves_nothing_behind(tmp_path, capsys, corpus_docs):
    good = tmp_path / "a.txt"
    write_txt(good, corpus_docs)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    msg, out = fails(tmp_path, capsys, [good, bad])
    assert f"{bad}:2:" in msg
    assert not out.exists()


def test_command_line_error_is_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep",
            "--input",
            str(tmp_path / "x.bin"),
            "--output",
            str(tmp_path / "o"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "x.bin" in result.stderr
    assert "Traceback" not in result.stderr


def test_builtin_corpus_and_inspect(tmp_path, capsys):
    out = str(tmp_path / "builtin")
    assert (
        main(
            [
                "--input",
                "builtin:python-docstrings",
                "--output",
                out,
                "--seq-len",
                "64",
                "--vocab-size",
                "2000",
                "--tokenizer-sample-mb",
                "1",
            ]
        )
        == 0
    )
    m = load_manifest(out)
    assert m.split("train")["tokens"] > 300_000 and m.split("valid")["rows"] > 0
    from data_prep.inspect import main as inspect_main

    capsys.readouterr()
    assert inspect_main([out, "--samples", "2"]) == 0
    shown = capsys.readouterr().out
    assert "train[1]: [CLS]" in shown and "seq_len 64" in shown


def test_job_array_phases_give_the_same_bytes_as_one_run(tmp_path):
    """What slurm/prepare_data.sbatch does: tokenizer, then array tasks encode concurrently,
    then a plain run packs."""
    big = tmp_path / "big.txt"
    write_txt(big, documents(4000, seed=8))
    single = prep(tmp_path, [big], "single", "--unit-mb", "0.2")
    out = str(tmp_path / "array")
    base = [
        sys.executable,
        "-m",
        "data_prep",
        "--input",
        str(big),
        "--output",
        out,
        "--seq-len",
        "32",
        "--vocab-size",
        "200",
        "--workers",
        "1",
        "--unit-mb",
        "0.2",
    ]
    subprocess.run([*base, "--phase", "tokenizer"], cwd=REPO, check=True, capture_output=True)
    tasks = [
        subprocess.Popen(
            [*base, "--phase", "encode", "--task-index", str(i), "--task-count", "3"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(3)
    ]
    for t in tasks:
        assert t.wait(timeout=300) == 0, t.stderr.read()
    units = [
        f
        for f in os.listdir(os.path.join(out, ".data_prep"))
        if f.endswith(".json") and f.startswith("unit-")
    ]
    assert len(units) >= 6 and not os.path.exists(os.path.join(out, "manifest.json"))
    subprocess.run(base, cwd=REPO, check=True, capture_output=True)
    assert tree_bytes(out) == tree_bytes(single)
