"""Task metrics (scikit-learn and SciPy) and their summary over seeds."""

from __future__ import annotations

import math
import statistics
import warnings

METRICS = ("accuracy", "f1", "matthews_correlation", "pearson", "spearman")


def compute(
    metrics: tuple[str, ...],
    labels: list,
    predictions: list,
    positive_label: str | None = None,
) -> dict[str, float | None]:
    """``{metric: value}`` of ``predictions`` against ``labels`` (class strings, or floats for
    a regression). A correlation of constant predictions is undefined: None."""
    from scipy.stats import ConstantInputWarning, pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    out = {}
    for name in metrics:
        if name == "accuracy":
            value = accuracy_score(labels, predictions)
        elif name == "f1":
            value = f1_score(labels, predictions, pos_label=positive_label, average="binary")
        elif name == "matthews_correlation":
            value = matthews_corrcoef(labels, predictions)
        elif name in ("pearson", "spearman"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConstantInputWarning)
                fn = pearsonr if name == "pearson" else spearmanr
                value = fn(labels, predictions)[0]
        else:
            raise AssertionError(name)
        value = float(value)
        out[name] = None if math.isnan(value) else value
    return out


def summarize(per_seed: dict[int, float | None]) -> dict:
    """``{"per_seed", "mean", "std"}``: std is the sample standard deviation (None with one
    seed); an undefined value anywhere makes the mean and std undefined."""
    values = list(per_seed.values())
    defined = None not in values
    return {
        "per_seed": {str(seed): value for seed, value in per_seed.items()},
        "mean": statistics.fmean(values) if defined else None,
        "std": statistics.stdev(values) if defined and len(values) > 1 else None,
    }
