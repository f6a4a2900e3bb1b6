"""Reference scores beside the model's: the majority class and a bag-of-words model.

- ``majority``: every dev example gets train's most frequent class (ties: the first in
  label order); for a regression, train's mean (so correlations are undefined: None).
- ``bow``: scikit-learn, TF-IDF of word unigrams (fit on train) and a logistic regression
  (ridge regression for a regression task). For pairs, the features are both texts'
  TF-IDF vectors, their element-wise product (the words they share, weighted) and three
  overlap figures: shared words over the union (Jaccard), shared words over A's words, and
  the length difference in words.
"""

from __future__ import annotations

from collections import Counter

from finetune.metrics import compute
from finetune.tasks import Split, Task

BASELINES = ("majority", "bow")


def majority_predictions(task: Task, split: Split) -> list:
    if task.regression:
        return [sum(task.train.labels) / len(task.train.labels)] * len(split)
    counts = Counter(task.train.labels)
    best = max(task.label_list, key=lambda label: (counts[label], -task.label_list.index(label)))
    return [best] * len(split)


def _overlap(a: str, b: str) -> list[float]:
    wa, wb = set(a.lower().split()), set(b.lower().split())
    shared = len(wa & wb)
    return [
        shared / max(len(wa | wb), 1),
        shared / max(len(wa), 1),
        abs(len(a.split()) - len(b.split())) / 10.0,
    ]


class BagOfWords:
    """TF-IDF features of a task's texts (and, for pairs, their overlap)."""

    def __init__(self, train: Split) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(lowercase=True, sublinear_tf=True)
        self.vectorizer.fit(train.text_a + (train.text_b or []))

    def features(self, split: Split):
        from scipy.sparse import csr_matrix, hstack

        a = self.vectorizer.transform(split.text_a)
        if split.text_b is None:
            return a
        b = self.vectorizer.transform(split.text_b)
        overlap = csr_matrix([_overlap(x, y) for x, y in zip(split.text_a, split.text_b)])
        return hstack([a, b, a.multiply(b), overlap]).tocsr()


def bow_predictions(task: Task, splits: list[Split]) -> list[list]:
    from sklearn.linear_model import LogisticRegression, Ridge

    bow = BagOfWords(task.train)
    x = bow.features(task.train)
    if task.regression:
        model = Ridge(alpha=1.0).fit(x, task.train.labels)
        return [[float(v) for v in model.predict(bow.features(s))] for s in splits]
    model = LogisticRegression(max_iter=2000).fit(x, task.train.labels)
    return [list(model.predict(bow.features(s))) for s in splits]


def run_baselines(task: Task) -> dict[str, dict[str, float | None]]:
    """``{baseline: {metric name: value}}`` on the task's dev split(s)."""
    splits = [s for _, s in task.evals]
    predictions = {
        "majority": [majority_predictions(task, s) for s in splits],
        "bow": bow_predictions(task, splits),
    }
    out = {}
    for name, per_split in predictions.items():
        out[name] = {}
        for (suffix, split), preds in zip(task.evals, per_split):
            scores = compute(task.metrics, split.labels, preds, task.positive_label)
            out[name].update({m + suffix: v for m, v in scores.items()})
    return out
