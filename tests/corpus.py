"""Small synthetic corpora for the tests: seeded, so every run builds the same bytes."""

from __future__ import annotations

import random

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "it",
    "at",
    "from",
    "his",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "or",
    "has",
    "had",
    "not",
    "but",
    "first",
    "one",
    "their",
    "its",
    "new",
    "after",
    "who",
    "they",
    "have",
    "her",
    "she",
    "two",
    "been",
    "other",
    "when",
    "there",
    "all",
    "during",
    "into",
    "school",
    "time",
    "may",
    "years",
    "more",
    "most",
    "only",
    "over",
    "city",
    "some",
    "world",
    "would",
    "where",
    "later",
    "up",
    "such",
    "used",
    "many",
    "can",
    "state",
    "about",
    "national",
    "out",
    "known",
    "university",
    "united",
    "then",
    "made",
    "film",
    "river",
    "language",
    "model",
    "token",
    "layer",
    "training",
    "data",
    "loss",
    "encoder",
    "attention",
    "gradient",
    "sequence",
    "batch",
    "shard",
    "rank",
    "node",
    "cluster",
    "checkpoint",
    "resume",
    "dropping",
]


def documents(n_docs: int, seed: int = 0, min_words: int = 5, max_words: int = 120) -> list[str]:
    """``n_docs`` documents of sentences drawn from a fixed word list (ASCII only)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        sentences, i = [], 0
        while i < len(words):
            n = rng.randint(4, 14)
            sentences.append(" ".join(words[i : i + n]).capitalize() + ".")
            i += n
        text = " ".join(sentences)
        if rng.random() < 0.3:  # some documents span several lines
            cut = text.find(" ", len(text) // 2)
            if cut > 0:
                text = text[:cut] + "\n" + text[cut + 1 :]
        docs.append(text)
    return docs


def write_txt(path, docs: list[str]) -> None:
    """Documents separated by blank lines (sometimes two, sometimes with spaces)."""
    seps = ["\n\n", "\n\n\n", "\n  \n"]
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(doc)
            f.write(seps[i % len(seps)])


def make_data(path, seed: int, seq_len: int = 64) -> str:
    """A small DATA_DIR for training tests (3,000 documents, vocabulary 200)."""
    from data_prep.cli import main as data_prep

    write_txt(path.parent / f"corpus{seed}.txt", documents(3000, seed=seed))
    assert (
        data_prep(
            [
                "--input",
                str(path.parent / f"corpus{seed}.txt"),
                "--output",
                str(path),
                "--seq-len",
                str(seq_len),
                "--vocab-size",
                "200",
                "--workers",
                "1",
                "--valid-fraction",
                "0.05",
            ]
        )
        == 0
    )
    return str(path)
