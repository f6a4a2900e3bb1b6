"""GLUE-format tasks as users have them on disk: layouts, reading, and the checks.

A task directory holds a ``train`` and a ``dev`` split, and optionally ``test``, each one
file: ``NAME.tsv`` (tab-separated, a header row naming the columns) or ``NAME.jsonl`` (one
JSON object per line). Examples are one text or a pair of texts with a label, categorical
(classification) or real-valued (regression).

The eight GLUE tasks are known by their directory's name (``CoLA``, ``SST-2``, ``MRPC``,
``STS-B``, ``QQP``, ``MNLI``, ``QNLI``, ``RTE``, any case, hyphen optional): their files,
columns and official metrics are in :data:`GLUE`. TSV files are read with
``csv.QUOTE_NONE``: quotes are text (GLUE's files have unbalanced ones).

Any other directory is read with default field names, the first present of
:data:`PAIR_FIELDS` or else :data:`SINGLE_FIELDS` for the text, :data:`LABEL_FIELDS` for the
label (``--text-fields`` / ``--label-field`` to choose others); its labels are a regression
target when every train label is a number and some is not an integer.

Everything a user can get wrong raises :class:`FinetuneError` here, before any training.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field

from finetune.errors import FinetuneError

PAIR_FIELDS = (
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("text_a", "text_b"),
)
SINGLE_FIELDS = ("sentence", "text", "text_a")
LABEL_FIELDS = ("label", "gold_label", "score", "is_duplicate")
INDEX_FIELDS = ("index", "idx", "id")  # the ids of test predictions, else the row number
# GLUE's QQP has a few rows that break under QUOTE_NONE; more than this share is an error
MAX_MALFORMED_FRACTION = 0.001


@dataclass(frozen=True)
class GlueLayout:
    """How one GLUE task looks in the GLUE distribution (``download_glue_data.py``)."""

    name: str  # cola
    dir_name: str  # CoLA
    text_fields: tuple[str, ...]
    label_field: str
    metrics: tuple[str, ...]  # the official ones, in GLUE's order
    regression: bool = False
    dev_splits: tuple[tuple[str, str], ...] = (("dev", ""),)  # (file stem, metric suffix)
    test_splits: tuple[str, ...] = ("test",)
    headerless: tuple[str, ...] | None = None  # column names of header-less train/dev files
    positive_label: str | None = None  # the class that F1 counts


GLUE: dict[str, GlueLayout] = {
    layout.name: layout
    for layout in (
        # train/dev: no header; test.tsv: header "index sentence"
        GlueLayout(
            "cola",
            "CoLA",
            ("sentence",),
            "label",
            ("matthews_correlation",),
            headerless=("source", "label", "annotation", "sentence"),
        ),
        GlueLayout("sst2", "SST-2", ("sentence",), "label", ("accuracy",)),
        # header: Quality #1 ID #2 ID #1 String #2 String
        GlueLayout(
            "mrpc",
            "MRPC",
            ("#1 String", "#2 String"),
            "Quality",
            ("f1", "accuracy"),
            positive_label="1",
        ),
        # header: index genre filename year old_index source1 source2 sentence1 sentence2 score
        GlueLayout(
            "stsb",
            "STS-B",
            ("sentence1", "sentence2"),
            "score",
            ("pearson", "spearman"),
            regression=True,
        ),
        # header: id qid1 qid2 question1 question2 is_duplicate
        GlueLayout(
            "qqp",
            "QQP",
            ("question1", "question2"),
            "is_duplicate",
            ("f1", "accuracy"),
            positive_label="1",
        ),
        # header: index promptID pairID genre sentence1_binary_parse ... sentence1 sentence2
        # label1 [label2 .. label5 in dev] gold_label
        GlueLayout(
            "mnli",
            "MNLI",
            ("sentence1", "sentence2"),
            "gold_label",
            ("accuracy",),
            dev_splits=(("dev_matched", "_m"), ("dev_mismatched", "_mm")),
            test_splits=("test_matched", "test_mismatched"),
        ),
        GlueLayout("qnli", "QNLI", ("question", "sentence"), "label", ("accuracy",)),
        GlueLayout("rte", "RTE", ("sentence1", "sentence2"), "label", ("accuracy",)),
    )
}


def glue_layout(dir_name: str) -> GlueLayout | None:
    """The GLUE layout a directory's name stands for (``SST-2``, ``sst2``, ``sst_2``)."""
    key = os.path.basename(os.path.normpath(dir_name)).lower().replace("-", "").replace("_", "")
    return GLUE.get(key)


@dataclass
class Split:
    """One file of a task, read: texts, labels (None for an unlabelled test split), ids."""

    name: str  # train, dev, dev_matched, test, ...
    path: str
    text_a: list[str]
    text_b: list[str] | None
    labels: list | None  # str classes, or floats for regression
    ids: list[str]

    def __len__(self) -> int:
        return len(self.text_a)


@dataclass
class Task:
    """A task ready to fine-tune on, every check passed."""

    name: str
    source: str  # the directory, or builtin:NAME
    layout: str  # glue:cola, generic, builtin:word-order
    text_fields: tuple[str, ...]
    label_field: str
    regression: bool
    metrics: tuple[str, ...]
    train: Split
    evals: list[tuple[str, Split]]  # (metric-name suffix, split)
    tests: list[Split] = field(default_factory=list)
    label_list: list[str] = field(default_factory=list)  # classes in id order
    positive_label: str | None = None
    skipped_rows: dict[str, int] = field(default_factory=dict)
    baselines: bool = False  # report the baselines without --baselines

    def metric_names(self) -> list[str]:
        """Result keys: each metric, suffixed per dev split (MNLI: accuracy_m, accuracy_mm)."""
        return [m + suffix for suffix, _ in self.evals for m in self.metrics]


# -- reading files ------------------------------------------------------------------------


def _read_tsv(path: str, headerless: tuple[str, ...] | None) -> tuple[list[str], list, int]:
    """(columns, [(line number, {column: value})], rows skipped as malformed)."""
    csv.field_size_limit(2**31 - 1)
    rows, malformed = [], []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            columns = list(headerless) if headerless else None
            for values in reader:
                line = reader.line_num
                if not values or values == [""]:
                    continue
                if columns is None:
                    columns = [c.strip() for c in values]
                    continue
                if len(values) != len(columns):
                    if headerless and not rows and not malformed:
                        raise FinetuneError(
                            f"{path} line {line}: {len(values)} fields, but this GLUE layout's "
                            f"{os.path.basename(path)} has no header row and "
                            f"{len(columns)} columns ({', '.join(columns)})"
                        )
                    malformed.append(line)
                    continue
                rows.append((line, dict(zip(columns, values))))
    except UnicodeDecodeError as e:
        raise FinetuneError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if columns is None:
        raise FinetuneError(f"{path}: empty file")
    if malformed and len(malformed) > MAX_MALFORMED_FRACTION * (len(rows) + len(malformed)):
        raise FinetuneError(
            f"{path} line {malformed[0]}: the row does not have the header's {len(columns)} "
            f"fields ({len(malformed)} such rows)"
        )
    return columns, rows, len(malformed)


def _read_jsonl(path: str) -> tuple[list[str], list, int]:
    rows, columns = [], None
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise FinetuneError(f"{path} line {line}: not JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise FinetuneError(f"{path} line {line}: not a JSON object")
                if columns is None:
                    columns = list(obj)
                rows.append((line, obj))
    except UnicodeDecodeError as e:
        raise FinetuneError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return columns or [], rows, 0


def _split_file(directory: str, stem: str, required: bool) -> str | None:
    found = [
        os.path.join(directory, stem + ext)
        for ext in (".tsv", ".jsonl")
        if os.path.isfile(os.path.join(directory, stem + ext))
    ]
    if len(found) > 1:
        raise FinetuneError(f"{directory}: both {stem}.tsv and {stem}.jsonl; keep one")
    if not found and required:
        raise FinetuneError(f"{directory}: no {stem}.tsv or {stem}.jsonl")
    return found[0] if found else None


def _label_str(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def _number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _choose_text(path: str, columns: list[str]) -> tuple[str, ...]:
    present = set(columns)
    text = next((pair for pair in PAIR_FIELDS if set(pair) <= present), None)
    if text is None:
        text = next(((name,) for name in SINGLE_FIELDS if name in present), None)
    if text is None:
        raise FinetuneError(
            f"{path}: no text column among {', '.join(columns) or 'none'}; "
            "name it (or a pair) with --text-fields"
        )
    return text


def _choose_label(path: str, columns: list[str]) -> str:
    label = next((name for name in LABEL_FIELDS if name in columns), None)
    if label is None:
        raise FinetuneError(
            f"{path}: no label column among {', '.join(columns) or 'none'}; "
            "name it with --label-field"
        )
    return label


@dataclass
class _RawSplit:
    name: str
    path: str
    columns: list[str]
    rows: list  # (line, {field: value})
    skipped: int


def _read_split(path: str, name: str, headerless: tuple[str, ...] | None) -> _RawSplit:
    if path.endswith(".tsv"):
        columns, rows, skipped = _read_tsv(
            path, headerless if not name.startswith("test") else None
        )
    else:
        columns, rows, skipped = _read_jsonl(path)
    if not rows:
        raise FinetuneError(f"{path}: no examples (the {name} split is empty)")
    return _RawSplit(name, path, columns, rows, skipped)


def _to_split(raw: _RawSplit, text_fields, label_field, labelled: bool, regression: bool) -> Split:
    # a JSONL file's columns are its first object's keys; later objects are checked per line
    for name in (*text_fields, *([label_field] if labelled else [])):
        if name not in raw.columns:
            what = "label" if name == label_field else "text"
            raise FinetuneError(
                f"{raw.path}: no {what} column {name!r} (columns: {', '.join(raw.columns)})"
            )
    index_field = next((f for f in INDEX_FIELDS if f in raw.columns), None)
    text_a, text_b, labels, ids = [], [] if len(text_fields) == 2 else None, [], []
    for number, (line, row) in enumerate(raw.rows):
        texts = []
        for name in text_fields:
            value = row.get(name)
            if value is None:
                raise FinetuneError(f"{raw.path} line {line}: no text field {name!r}")
            texts.append(str(value))
        text_a.append(texts[0])
        if text_b is not None:
            text_b.append(texts[1])
        ids.append(str(row[index_field]) if index_field and index_field in row else str(number))
        if labelled:
            if label_field not in row:
                raise FinetuneError(f"{raw.path} line {line}: no label field {label_field!r}")
            value = row[label_field]
            label = _number(value) if regression else _label_str(value)
            if label is None:
                kind = "a number (the task is a regression)" if regression else "a label"
                raise FinetuneError(
                    f"{raw.path} line {line}: {label_field} {value!r} is not {kind}"
                )
            labels.append(label)
    return Split(raw.name, raw.path, text_a, text_b, labels if labelled else None, ids)


def _is_regression(raw: _RawSplit, label_field: str) -> bool:
    numbers = [_number(row.get(label_field)) for _, row in raw.rows]
    return all(n is not None for n in numbers) and any(not n.is_integer() for n in numbers)


def _sorted_labels(labels) -> list[str]:
    values = set(labels)
    try:
        return sorted(values, key=int)
    except ValueError:
        return sorted(values)


def check_labels(task: Task) -> None:
    """Classification: two classes at least in train, and no dev label train lacks."""
    if task.regression:
        return
    if len(task.label_list) < 2:
        raise FinetuneError(
            f"{task.train.path}: one class only ({task.label_list[0]!r}); a classifier needs two"
        )
    known = set(task.label_list)
    for _, split in task.evals:
        unseen = sorted(set(split.labels) - known)
        if unseen:
            shown = ", ".join(repr(u) for u in unseen[:5])
            raise FinetuneError(
                f"{split.path}: label(s) {shown} never occur in train ({task.train.path}); "
                "a classifier cannot predict them"
            )


def load_task_dir(
    directory: str,
    text_fields: tuple[str, ...] | None = None,
    label_field: str | None = None,
    regression: bool = False,
) -> Task:
    """Read and check one task directory (GLUE layout by its name, else the generic one)."""
    layout = glue_layout(directory)
    headerless = layout.headerless if layout else None
    train_raw = _read_split(_split_file(directory, "train", True), "train", headerless)

    dev_stems = layout.dev_splits if layout else (("dev", ""),)
    evals_raw = []
    for stem, suffix in dev_stems:
        path = _split_file(directory, stem, required=len(dev_stems) == 1)
        if path:
            evals_raw.append((suffix, _read_split(path, stem, headerless)))
    if not evals_raw:
        raise FinetuneError(
            f"{directory}: no dev split ({' or '.join(s + '.tsv' for s, _ in dev_stems)})"
        )
    tests_raw = []
    for stem in layout.test_splits if layout else ("test",):
        path = _split_file(directory, stem, required=False)
        if path:
            tests_raw.append(_read_split(path, stem, None))

    if layout is not None and train_raw.path.endswith(".tsv"):
        text_fields = text_fields or layout.text_fields
        label_field = label_field or layout.label_field
    else:  # generic, or a GLUE task saved as JSONL (Hugging Face datasets' field names)
        text_fields = text_fields or _choose_text(train_raw.path, train_raw.columns)
        label_field = label_field or _choose_label(train_raw.path, train_raw.columns)
    text_fields = tuple(text_fields)
    if layout is not None:
        regression = layout.regression
    else:
        regression = regression or _is_regression(train_raw, label_field)

    train = _to_split(train_raw, text_fields, label_field, True, regression)
    evals = [
        (suffix, _to_split(raw, text_fields, label_field, True, regression))
        for suffix, raw in evals_raw
    ]
    tests = []
    for raw in tests_raw:  # GLUE's test files have no labels: predictions only
        tests.append(_to_split(raw, text_fields, label_field, False, regression))
    if layout is not None:
        metrics = layout.metrics
    else:
        metrics = ("pearson", "spearman") if regression else ("accuracy",)
    task = Task(
        name=layout.name if layout else os.path.basename(os.path.normpath(directory)),
        source=os.path.abspath(directory),
        layout=f"glue:{layout.name}" if layout else "generic",
        text_fields=text_fields,
        label_field=label_field,
        regression=regression,
        metrics=metrics,
        train=train,
        evals=evals,
        tests=tests,
        label_list=[] if regression else _sorted_labels(train.labels),
        positive_label=layout.positive_label if layout else None,
        skipped_rows={
            raw.name: raw.skipped
            for raw in (train_raw, *(r for _, r in evals_raw), *tests_raw)
            if raw.skipped
        },
    )
    if task.positive_label is not None and task.positive_label not in task.label_list:
        raise FinetuneError(
            f"{train.path}: {task.name} labels are {', '.join(task.label_list)}; "
            f"expected GLUE's 0/1 with {task.positive_label!r} the positive class"
        )
    check_labels(task)
    return task


def _has_train(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, "train" + e)) for e in (".tsv", ".jsonl"))


def load_tasks(
    spec: str,
    text_fields: tuple[str, ...] | None = None,
    label_field: str | None = None,
    regression: bool = False,
) -> list[Task]:
    """The tasks ``--task`` names: ``builtin:NAME``, a task directory, or a directory of
    task directories (GLUE's ``glue_data/``: every subdirectory with a train file, GLUE's
    tasks first in GLUE's order). A bare GLUE name (``rte``) is looked up in ``$GLUE_DIR``."""
    if spec.startswith("builtin:"):
        from finetune.builtin_task import load_builtin

        return load_builtin(spec[len("builtin:") :])
    directory = spec
    if not os.path.exists(directory):
        layout = glue_layout(spec) if os.sep not in spec else None
        glue_dir = os.environ.get("GLUE_DIR")
        candidates = (
            [os.path.join(glue_dir, n) for n in (layout.dir_name, layout.name)]
            if layout and glue_dir
            else []
        )
        directory = next((c for c in candidates if os.path.isdir(c)), None)
        if directory is None:
            hint = (
                f" (nor {layout.dir_name} in $GLUE_DIR)"
                if layout and glue_dir
                else " (set GLUE_DIR to find GLUE tasks by name)"
                if layout
                else ""
            )
            raise FinetuneError(f"--task {spec}: no such directory{hint}")
    if not os.path.isdir(directory):
        raise FinetuneError(f"--task {spec}: not a directory (give the task's directory)")
    if _has_train(directory):
        return [load_task_dir(directory, text_fields, label_field, regression)]
    subdirs = sorted(
        d
        for d in os.listdir(directory)
        if os.path.isdir(os.path.join(directory, d)) and _has_train(os.path.join(directory, d))
    )
    if not subdirs:
        raise FinetuneError(
            f"--task {spec}: no train.tsv or train.jsonl in the directory nor in its subdirectories"
        )
    order = list(GLUE)

    def rank(d: str):
        layout = glue_layout(d)
        return (order.index(layout.name), d) if layout else (len(order), d)

    tasks = [
        load_task_dir(os.path.join(directory, d), text_fields, label_field, regression)
        for d in sorted(subdirs, key=rank)
    ]
    names = [t.name for t in tasks]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise FinetuneError(f"--task {spec}: two directories hold {duplicate}; keep one")
    return tasks
