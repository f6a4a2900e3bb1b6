"""Three downstream tasks built from the standard library's docstrings: no download needed.

The text is what data_prep's built-in corpus reads (:mod:`data_prep.builtin_corpus`), its
test suites left out (``test/``, ``tests/``, ``idle_test/`` directories): docstrings cut
into sentences, keeping plain prose only (5 to 40 words, ASCII, a capital first and a full
stop last, none of the characters of code such as ``= _ [ ] < > `` ``, no call ``f(x)``,
no ``>>>``).

All tasks split by module (the ``.py`` file), stratified by the topic of the module's
package (below; every other module is one more stratum): within a stratum, modules are
taken in a seeded order into dev until dev holds :data:`DEV_FRACTION` of the stratum's
sentences. A dev example whose text (any of its sentences) also occurs in a train module is
dropped, so no sentence is in both splits. Labels are balanced. Everything is a function of
the seed (and of the Python version, whose standard library is the text).

The built-in pretraining corpus (``builtin:python-docstrings``) holds these docstrings, dev
modules included: a model pretrained on it has seen the dev sentences (never their
labels). For a measurement without that, pretrain on text without the modules that
:func:`dev_modules` lists.

- ``topic`` (single sentence, four classes, accuracy): which part of the library does the
  sentence document: ``gui`` (tkinter, idlelib, turtledemo), ``concurrency`` (asyncio,
  concurrent, multiprocessing), ``internet`` (email, http, urllib, xmlrpc, wsgiref) or
  ``packaging`` (distutils, importlib, ensurepip, venv). Each class has as many examples as
  the smallest (per split); a sentence found in two classes is left out. Words carry most
  of the signal, so a bag of words does well; what pretraining adds is knowing the words
  that the few train examples never show.
- ``word-order`` (single sentence, accuracy): is the word order original (label 1) or
  locally corrupted (0): two adjacent words swapped, or a span of three shuffled. Only
  lower-case words without punctuation move, never the first or last word, so the bag of
  words, the length, the capitals and the punctuation of both classes are the same: a
  bag-of-words model is at chance.
- ``next-sentence`` (pair, accuracy): is sentence B the one that follows A in the same
  docstring (1), or a sentence of another docstring of the same module (0)? A's are the
  same kind of sentence in both classes (ones a sentence follows). Negatives are hard: the
  same module's vocabulary, never a docstring's first sentence (true next sentences never
  are), and within two words of the true next sentence's length.

``python -m finetune.builtin_task --output DIR`` writes them as GLUE-format directories
(``DIR/topic/{train,dev}.tsv`` and ``DIR/word-order/...`` with columns ``sentence label``,
``DIR/next-sentence/...`` with ``sentence1 sentence2 label``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import sysconfig
import zlib
from dataclasses import dataclass

from data_prep.atomic import write_atomic
from finetune.errors import FinetuneError
from finetune.tasks import Split, Task

BUILTIN_TASKS = {
    "topic": "which part of the standard library a sentence documents: gui, concurrency, "
    "internet or packaging",
    "word-order": "is the sentence's word order original (1) or locally corrupted (0)",
    "next-sentence": "does sentence B follow A in its docstring (1) or come from another "
    "docstring of the module (0)",
}
DEFAULT_SEED = 0
DEV_FRACTION = 0.2
MAX_EXAMPLES = {"train": 6000, "dev": 1500}  # per task and split
MIN_WORDS, MAX_WORDS = 5, 40
LENGTH_TOLERANCE = 2  # words between a negative B and the true next sentence

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE = re.compile(r"[=_\[\]{}<>`*#|\\/@$%~^]|\w\(|\(\)|>>>|\.\.|::")  # code; calls f(x)
_MOVABLE = re.compile(r"[a-z]+")  # a word that may move in word-order
_TEST_DIRS = {"test", "tests", "idle_test"}
TOPICS = {  # class: the top-level packages whose modules it takes
    "concurrency": ("asyncio", "concurrent", "multiprocessing"),
    "gui": ("tkinter", "idlelib", "turtledemo"),
    "internet": ("email", "http", "urllib", "xmlrpc", "wsgiref"),
    "packaging": ("distutils", "importlib", "ensurepip", "venv"),
}
_TOPIC_OF = {package: topic for topic, packages in TOPICS.items() for package in packages}


def topic_of(module: str) -> str | None:
    """The :data:`TOPICS` class of a module (``asyncio/tasks.py``), None outside them."""
    package, sep, _ = module.partition("/")
    return _TOPIC_OF.get(package) if sep else None


@dataclass
class Docstring:
    sentences: list[str | None]  # None where a sentence is not plain prose


def _plain(sentence: str) -> bool:
    words = sentence.split()
    return (
        MIN_WORDS <= len(words) <= MAX_WORDS
        and sentence.isascii()
        and sentence[0].isupper()
        and sentence.endswith(".")
        and not _CODE.search(sentence)
        and not any(c.isdigit() for c in words[-1])
    )


def read_modules() -> dict[str, list[Docstring]]:
    """The standard library's modules (path relative to the library, sorted), each its
    docstrings as sentences; data_prep's built-in corpus reader does the parsing."""
    from data_prep.builtin_corpus import docstrings, stdlib_files

    root = sysconfig.get_paths()["stdlib"]
    modules = {}
    for path in stdlib_files():
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        if _TEST_DIRS & set(rel.split("/")[:-1]):
            continue
        docs = []
        for doc in docstrings(path):
            sentences = _SENTENCE_END.split(" ".join(doc.split()))
            docs.append(Docstring([s if _plain(s) else None for s in sentences]))
        if docs:
            modules[rel] = docs
    return modules


def split_modules(modules: dict[str, list[Docstring]], seed: int) -> dict[str, list[str]]:
    """{"train": [...], "dev": [...]} module names: within each topic (and among the modules
    of none), a seeded order fills dev first."""
    strata: dict[str, list[str]] = {}
    for m in modules:
        strata.setdefault(topic_of(m) or "", []).append(m)
    count = {m: sum(s is not None for d in modules[m] for s in d.sentences) for m in modules}
    dev = set()
    for stratum in sorted(strata):
        names = sorted(strata[stratum], key=lambda m: zlib.crc32(f"{seed}:{m}".encode()))
        total, dev_count = sum(count[m] for m in names), 0
        for m in names:
            if dev_count >= DEV_FRACTION * total:
                break
            dev.add(m)
            dev_count += count[m]
    return {"train": sorted(m for m in modules if m not in dev), "dev": sorted(dev)}


def dev_modules(seed: int = DEFAULT_SEED) -> list[str]:
    """The standard-library modules (paths relative to the library, ``json/decoder.py``)
    whose sentences make the built-in tasks' dev split for ``seed``."""
    return split_modules(read_modules(), seed)["dev"]


def _balanced_labels(n: int, rng: random.Random) -> list[str]:
    labels = ["1" if i % 2 == 0 else "0" for i in range(n)]
    rng.shuffle(labels)
    return labels


# -- topic ---------------------------------------------------------------------------------


def topic_examples(
    modules: dict[str, list[Docstring]], names: list[str], exclude: set[str], seed: int, split: str
) -> tuple[list[str], list[str]]:
    """(sentences, labels) of one split: each class's unique plain sentences, as many per
    class as the smallest class has (at most an equal share of :data:`MAX_EXAMPLES`)."""
    pools: dict[str, set[str]] = {topic: set() for topic in TOPICS}
    for m in names:
        topic = topic_of(m)
        if topic is not None:
            pools[topic] |= {s for d in modules[m] for s in d.sentences if s and s not in exclude}
    seen_in: dict[str, int] = {}
    for pool in pools.values():
        for s in pool:
            seen_in[s] = seen_in.get(s, 0) + 1
    per_class = {t: sorted(s for s in pool if seen_in[s] == 1) for t, pool in pools.items()}
    n = min(min(map(len, per_class.values())), MAX_EXAMPLES[split] // len(TOPICS))
    rng = random.Random(f"topic:{seed}:{split}")
    examples = [(s, t) for t in sorted(per_class) for s in rng.sample(per_class[t], n)]
    rng.shuffle(examples)
    return [s for s, _ in examples], [t for _, t in examples]


# -- word-order ----------------------------------------------------------------------------


def _spans(words: list[str], width: int) -> list[int]:
    """Starts of ``width`` consecutive movable words, first and last word excluded, that are
    not all the same word (so that moving them changes the sentence)."""
    return [
        i
        for i in range(1, len(words) - width)
        if all(_MOVABLE.fullmatch(w) for w in words[i : i + width])
        and len(set(words[i : i + width])) > 1
    ]


def corrupt(sentence: str, rng: random.Random) -> tuple[str, str]:
    """(corrupted sentence, kind): adjacent ``swap`` or a ``shuffle`` of three words."""
    words = sentence.split()
    if rng.random() < 0.5:
        i = rng.choice(_spans(words, 2))
        words[i], words[i + 1] = words[i + 1], words[i]
        return " ".join(words), "swap"
    i = rng.choice(_spans(words, 3))
    span = words[i : i + 3]
    shuffled = span
    while shuffled == span:
        shuffled = rng.sample(span, 3)
    words[i : i + 3] = shuffled
    return " ".join(words), "shuffle"


def word_order_examples(
    modules: dict[str, list[Docstring]], names: list[str], exclude: set[str], seed: int, split: str
) -> tuple[list[str], list[str]]:
    """(sentences, labels) of one split: unique plain sentences that can be corrupted both
    ways, half of them corrupted."""
    pool = sorted(
        {
            s
            for m in names
            for d in modules[m]
            for s in d.sentences
            if s is not None and s not in exclude and _spans(s.split(), 3)
        }
    )
    rng = random.Random(f"word-order:{seed}:{split}")
    rng.shuffle(pool)
    pool = pool[: MAX_EXAMPLES[split]]
    labels = _balanced_labels(len(pool), rng)
    sentences = [s if y == "1" else corrupt(s, rng)[0] for s, y in zip(pool, labels)]
    return sentences, labels


# -- next-sentence -------------------------------------------------------------------------


def next_sentence_examples(
    modules: dict[str, list[Docstring]], names: list[str], exclude: set[str], seed: int, split: str
) -> tuple[list[str], list[str], list[str]]:
    """(sentences A, sentences B, labels) of one split."""
    rng = random.Random(f"next-sentence:{seed}:{split}")
    candidates = []  # (module, docstring index, A, true next)
    used_a, follows = set(), set()
    for m in names:
        for d, doc in enumerate(modules[m]):
            s = doc.sentences
            for i in range(len(s) - 1):
                a, b = s[i], s[i + 1]
                follows.add((a, b))
                if a is None or b is None or a in used_a or a == b or {a, b} & exclude:
                    continue
                used_a.add(a)
                candidates.append((m, d, a, b))
    # negatives: other docstrings' sentences of the module that are not a docstring's first
    later = {
        m: [(d, s) for d, doc in enumerate(modules[m]) for s in doc.sentences[1:] if s]
        for m in names
    }
    usable = []
    for m, d, a, b in candidates:
        others = [
            s
            for d2, s in later[m]
            if d2 != d and s != a and (a, s) not in follows and s not in exclude
        ]
        if others:
            usable.append((m, d, a, b, others))
    rng.shuffle(usable)
    usable = usable[: MAX_EXAMPLES[split]]
    labels = _balanced_labels(len(usable), rng)
    text_a, text_b = [], []
    for (_, _, a, b, others), label in zip(usable, labels):
        if label == "0":
            n = len(b.split())
            gaps = sorted({abs(len(s.split()) - n) for s in others})
            near = max(gaps[0], LENGTH_TOLERANCE)
            b = rng.choice(sorted({s for s in others if abs(len(s.split()) - n) <= near}))
        text_a.append(a)
        text_b.append(b)
    return text_a, text_b, labels


# -- tasks -----------------------------------------------------------------------------------


def build_tasks(
    names: list[str], seed: int = DEFAULT_SEED, modules: dict[str, list[Docstring]] | None = None
) -> list[Task]:
    """The built-in tasks ``names`` as :class:`~finetune.tasks.Task` objects (``modules``:
    :func:`read_modules`' result, read here when not given)."""
    modules = read_modules() if modules is None else modules
    split = split_modules(modules, seed)
    train_sentences = {s for m in split["train"] for d in modules[m] for s in d.sentences if s}
    tasks = []
    for name in names:
        source = f"builtin:{name}"
        splits = {}
        for part in ("train", "dev"):
            exclude = set() if part == "train" else train_sentences
            where = f"{source} (seed {seed}) {part}"
            b = None
            if name == "topic":
                a, labels = topic_examples(modules, split[part], exclude, seed, part)
            elif name == "word-order":
                a, labels = word_order_examples(modules, split[part], exclude, seed, part)
            else:
                a, b, labels = next_sentence_examples(modules, split[part], exclude, seed, part)
            splits[part] = Split(part, where, a, b, labels, [str(i) for i in range(len(a))])
        tasks.append(
            Task(
                name=name,
                source=source,
                layout=source,
                text_fields=("sentence",) if b is None else ("sentence1", "sentence2"),
                label_field="label",
                regression=False,
                metrics=("accuracy",),
                train=splits["train"],
                evals=[("", splits["dev"])],
                label_list=sorted(TOPICS) if name == "topic" else ["0", "1"],
                baselines=True,
            )
        )
    return tasks


def load_builtin(name: str, seed: int = DEFAULT_SEED) -> list[Task]:
    """``--task builtin:NAME``: one of :data:`BUILTIN_TASKS`, or ``all``."""
    if name == "all":
        return build_tasks(list(BUILTIN_TASKS), seed)
    if name not in BUILTIN_TASKS:
        raise FinetuneError(
            f"--task builtin:{name}: unknown built-in task (available: "
            + ", ".join(f"builtin:{n}" for n in (*BUILTIN_TASKS, "all"))
            + ")"
        )
    return build_tasks([name], seed)


def write_task(task: Task, directory: str) -> None:
    """Write ``task`` as a GLUE-format directory: ``train.tsv`` and ``dev.tsv`` with a
    header row (texts never hold tabs or newlines: they are whitespace-normalised)."""
    os.makedirs(directory, exist_ok=True)
    for split in (task.train, *(s for _, s in task.evals)):
        rows = zip(split.text_a, *([split.text_b] if split.text_b else []), split.labels)
        lines = ["\t".join((*task.text_fields, task.label_field)), *map("\t".join, rows)]
        text = "".join(line + "\n" for line in lines)
        write_atomic(os.path.join(directory, f"{split.name}.tsv"), text.encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m finetune.builtin_task",
        description="Write the built-in downstream tasks as GLUE-format directories.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", required=True, metavar="DIR", help="one subdirectory per task")
    p.add_argument(
        "--tasks", default=",".join(BUILTIN_TASKS), help="comma-separated built-in task names"
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="examples and split")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    unknown = [n for n in names if n not in BUILTIN_TASKS]
    if unknown or not names:
        print(
            f"finetune.builtin_task: error: unknown task {', '.join(unknown) or '(none)'} "
            f"(available: {', '.join(BUILTIN_TASKS)})",
            file=sys.stderr,
        )
        return 2
    for task in build_tasks(names, args.seed):
        directory = os.path.join(args.output, task.name)
        write_task(task, directory)
        sizes = {"train": len(task.train), "dev": len(task.evals[0][1])}
        with open(os.path.join(directory, "task.json"), "w") as f:
            json.dump(
                {
                    "task": task.source,
                    "description": BUILTIN_TASKS[task.name],
                    "seed": args.seed,
                    "python": sys.version.split()[0],
                    "examples": sizes,
                },
                f,
                indent=2,
            )
        print(f"{directory}: train {sizes['train']:,}, dev {sizes['dev']:,} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
