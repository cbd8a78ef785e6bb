"""Paired statistics against hand-computed cases."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binomtest

from pipeline.stats import mean_stderr, paired


def items(values):
    return {f"t/{i}": float(v) for i, v in enumerate(values)}


def test_identical_model_gives_zero_difference():
    base = items([1, 0, 1, 1, 0, 1, 0, 0, 1, 1])
    p = paired(base, dict(base))
    assert (p.diff, p.ci_low, p.ci_high, p.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert (p.correct_to_wrong, p.wrong_to_correct) == (0, 0) and not p.significant


def test_known_flip_matrix():
    # 100 items: 60 right in both, 25 wrong in both, 12 correct->wrong, 3 wrong->correct.
    base = [1] * 60 + [0] * 25 + [1] * 12 + [0] * 3
    var = [1] * 60 + [0] * 25 + [0] * 12 + [1] * 3
    p = paired(items(base), items(var))
    assert p.n == 100 and (p.correct_to_wrong, p.wrong_to_correct) == (12, 3)
    assert p.diff == pytest.approx(-0.09)
    assert p.p_value == pytest.approx(binomtest(12, 15, 0.5).pvalue)  # exact McNemar = 0.03516
    assert p.p_value == pytest.approx(0.0351562, abs=1e-6) and p.significant
    assert p.ci_low < -0.09 < p.ci_high < 0


def test_one_answer_changed_is_not_significant():
    base = [1, 0] * 50
    var = list(base)
    var[0] = 0
    p = paired(items(base), items(var))
    assert p.diff == pytest.approx(-0.01) and (p.correct_to_wrong, p.wrong_to_correct) == (1, 0)
    assert p.p_value == 1.0 and not p.significant
    assert p.ci_low <= -0.01 and p.ci_high == 0.0


def test_pairs_join_on_item_keys_not_order():
    base = {"a": 1.0, "b": 0.0, "c": 1.0}
    var = {"c": 1.0, "a": 1.0, "b": 0.0, "extra": 0.0}
    p = paired(base, var)
    assert p.n == 3 and p.diff == 0.0


def test_continuous_metric_uses_bootstrap():
    base = items([0.5, 0.6, 0.7, 0.8] * 10)
    var = items([0.4, 0.5, 0.6, 0.7] * 10)  # uniformly 0.1 lower
    p = paired(base, var)
    assert p.test == "paired-bootstrap" and p.correct_to_wrong is None
    assert p.diff == pytest.approx(-0.1) and p.ci_low == pytest.approx(-0.1) and p.ci_high == pytest.approx(-0.1)
    assert p.p_value == 0.0 and p.significant


def test_mean_stderr_matches_formula():
    m, se = mean_stderr([1, 0, 1, 1])
    assert m == 0.75 and se == pytest.approx(math.sqrt(0.25 / 4))
