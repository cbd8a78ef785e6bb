"""Paired statistics of a variant against the base on the same items.

lm-eval reports a standard error per score but no test of the difference between two models
on the same items. Pairing removes the between-item variance, so the interval on the
difference is much tighter than the two scores' intervals suggest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest


@dataclass
class Paired:
    n: int
    diff: float  # variant - base, in metric units (accuracy 0..1)
    ci_low: float
    ci_high: float
    p_value: float
    test: str
    correct_to_wrong: int | None = None  # flips, binary metrics only
    wrong_to_correct: int | None = None
    base_mean: float | None = None  # both rows' scores on the paired items: every comparison between rows uses these
    variant_mean: float | None = None
    unpaired: int = 0  # items only one of the two rows has (left out of every comparison)

    @property
    def significant(self) -> bool:
        return self.p_value < 0.05

    @property
    def flip_pct(self) -> float | None:
        if self.correct_to_wrong is None or not self.n:
            return None
        return 100 * (self.correct_to_wrong + self.wrong_to_correct) / self.n


def mean_stderr(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else float("nan")), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v)))


def paired(base: dict[str, float], variant: dict[str, float], iters: int = 10_000, seed: int = 0) -> Paired:
    """Join on item key; 95% paired-bootstrap interval for the mean difference; p-value from the
    exact McNemar test for 0/1 metrics, else from the bootstrap distribution."""
    keys = sorted(set(base) & set(variant))
    if not keys:
        return Paired(0, float("nan"), float("nan"), float("nan"), float("nan"), "none")
    unpaired = len(set(base) ^ set(variant))
    b = np.array([base[k] for k in keys])
    v = np.array([variant[k] for k in keys])
    d = v - b
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(iters, len(d)))].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    binary = bool(np.isin(b, (0.0, 1.0)).all() and np.isin(v, (0.0, 1.0)).all())
    if binary:
        c2w = int(((b == 1) & (v == 0)).sum())
        w2c = int(((b == 0) & (v == 1)).sum())
        p = 1.0 if c2w + w2c == 0 else binomtest(c2w, c2w + w2c, 0.5).pvalue
        return Paired(
            len(d), float(d.mean()), float(lo), float(hi), float(p), "mcnemar-exact", c2w, w2c, float(b.mean()), float(v.mean()), unpaired
        )
    if not d.any():
        p = 1.0
    else:
        p = min(1.0, 2 * min((boots <= 0).mean(), (boots >= 0).mean()))
    return Paired(
        len(d), float(d.mean()), float(lo), float(hi), float(p), "paired-bootstrap", None, None, float(b.mean()), float(v.mean()), unpaired
    )
