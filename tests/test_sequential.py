"""Seeded simulations of the sequential non-inferiority gate (pipeline/sequential.py).

Every error-rate test monitors after every round and stops at the first decision, the way the
gate runs. The contrast tests run the naive procedures on the same draws to show the
simulation can detect an invalid procedure.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline import sequential as sq

ALPHA = 0.05
MARGIN = 0.03
RUNS = 2000
BUDGET = 6400
LOOKS = sq.geometric_looks(50, BUDGET)  # 50, 100, 200, ..., 6400
# Thousands of simulated runs each (1-5 s): out of the `-m "not slow"` loop, in the full suite.
SIMULATION = pytest.mark.slow


def binary_drops(rng, runs, n, drop, discord=0.15):
    """Paired 0/1 items: P(base right, variant wrong) - P(base wrong, variant right) = drop,
    and the two together (the flips) = discord. d = base - variant in {-1, 0, 1}."""
    p10, p01 = (discord + drop) / 2, (discord - drop) / 2
    u = rng.random((runs, n))
    return np.where(u < p10, 1.0, np.where(u < p10 + p01, -1.0, 0.0))


def binary_pairs(rng, runs, n, base_acc, drop, discord=0.15):
    """The same law as (base, variant) score pairs, base accuracy base_acc."""
    p10, p01 = (discord + drop) / 2, (discord - drop) / 2
    base = (rng.random((runs, n)) < base_acc).astype(float)
    u = rng.random((runs, n))
    flip = np.where(base == 1, u < p10 / base_acc, u < p01 / (1 - base_acc))
    return base, np.where(flip, 1 - base, base)


def mc2_drops(rng, runs, n, drop, w=0.3):
    """TruthfulQA-MC2-like per-item probabilities: base ~ Beta(2.25, 2.75) (mean 0.45); the variant
    is 0.7 base + 0.3 z with z ~ Beta of mean 0.45 - drop/w (strongly paired), so the mean drop
    is exactly `drop` and the per-item SD about 0.085."""
    base = rng.beta(2.25, 2.75, size=(runs, n))
    mz = 0.45 - drop / w
    z = rng.beta(5 * mz, 5 * (1 - mz), size=(runs, n))
    return base - ((1 - w) * base + w * z)


def naive_peeking_pass_rate(d, looks, margin, z=1.6448536269514722):
    """Fixed-n one-sided 95% upper bound (mean + z sd / sqrt n), re-checked after every round:
    pass at the first look where it is below the margin."""
    idx = np.asarray(looks) - 1
    t = np.arange(1, d.shape[1] + 1)
    mean = (np.cumsum(d, axis=1) / t)[:, idx]
    var = (np.cumsum(d**2, axis=1) / t)[:, idx] - mean**2
    upper = mean + z * np.sqrt(var * t[idx] / (t[idx] - 1) / t[idx])
    return float((upper < margin).any(axis=1).mean())


def drop_gate(d, looks=LOOKS, method="betting"):
    return sq.simulate_gate(d, MARGIN, ALPHA, -1.0, 1.0, looks, method)


# --------------------------------------------------------------------------------------------
# Error rates under sequential monitoring
# --------------------------------------------------------------------------------------------


@SIMULATION
@pytest.mark.parametrize("method", ["betting", "eb", "agrapa"])
def test_false_pass_at_margin_binary(method):
    d = binary_drops(np.random.default_rng(1), RUNS, BUDGET, drop=MARGIN)
    r = drop_gate(d, method=method)
    assert r.pass_rate <= ALPHA
    assert r.fail_rate <= ALPHA  # at the margin H0_fail holds too
    # the same draws under naive peeking: the test can fail
    assert naive_peeking_pass_rate(d, LOOKS, MARGIN) > 0.08


@SIMULATION
def test_false_pass_at_margin_continuous():
    d = mc2_drops(np.random.default_rng(2), RUNS, BUDGET, drop=MARGIN)
    r = drop_gate(d)
    assert r.pass_rate <= ALPHA and r.fail_rate <= ALPHA
    # the CS adapts to the small variance: most runs at the margin stay undecided, not failed
    assert naive_peeking_pass_rate(d, LOOKS, MARGIN) > 0.08


def test_false_pass_looks_after_every_item():
    # Margin 10 points so decisions happen within 1,000 items; a look after each one.
    rng = np.random.default_rng(3)
    d = binary_drops(rng, RUNS, 1000, drop=0.10, discord=0.3)
    r = sq.simulate_gate(d, 0.10, ALPHA, -1.0, 1.0, None)
    assert r.pass_rate <= ALPHA and r.fail_rate <= ALPHA
    assert naive_peeking_pass_rate(d, range(2, 1001), 0.10) > 0.2


@SIMULATION
@pytest.mark.parametrize("gen", [binary_drops, mc2_drops])
def test_false_fail_when_lossless(gen):
    d = gen(np.random.default_rng(4), RUNS, BUDGET, drop=0.0)
    r = drop_gate(d)
    assert r.fail_rate <= ALPHA


def test_straddle_rule_passes_worse_variants():
    """The old rule (pass unless the whole 95% CI lies above the margin) at a fixed n passes
    most variants 2 points worse than the margin; the sequential gate passes almost none."""
    rng = np.random.default_rng(5)
    d = binary_drops(rng, RUNS, 800, drop=MARGIN + 0.02)
    mean, sd = d.mean(axis=1), d.std(axis=1, ddof=1)
    straddle_pass = (mean - 1.96 * sd / np.sqrt(800) <= MARGIN).mean()
    assert straddle_pass > 0.5
    assert drop_gate(d, sq.geometric_looks(50, 800)).pass_rate <= 0.01


@SIMULATION
def test_recovery_false_pass_at_ratio():
    r_min = 0.95
    base, var = binary_pairs(np.random.default_rng(6), RUNS, BUDGET, 0.6, drop=0.6 * (1 - r_min))
    y = var - r_min * base  # mean 0 exactly at the ratio threshold
    r = sq.simulate_gate(y, 0.0, ALPHA, -r_min, 1.0, LOOKS, pass_below=False)
    assert r.pass_rate <= ALPHA and r.fail_rate <= ALPHA
    # and it does pass a lossless variant
    base, var = binary_pairs(np.random.default_rng(7), RUNS, BUDGET, 0.6, drop=0.0)
    ok = sq.simulate_gate(var - r_min * base, 0.0, ALPHA, -r_min, 1.0, LOOKS, pass_below=False)
    assert ok.pass_rate > 0.8


@SIMULATION
def test_family_wise_error_four_checks_at_margin():
    """k = 4 checks all at their margin; Holm over anytime p-values (the last look's running
    minimum, which bounds every earlier look's Holm rejections). Any false pass in the family
    counts; likewise any false fail."""
    rng = np.random.default_rng(8)
    k, a_k, n = 4, ALPHA / 4, 3200
    data = [
        binary_drops(rng, RUNS, n, MARGIN, 0.10),
        binary_drops(rng, RUNS, n, MARGIN, 0.20),
        mc2_drops(rng, RUNS, n, MARGIN),
        binary_drops(rng, RUNS, n, MARGIN, 0.15),
    ]
    p = [sq.anytime_p_values(d, MARGIN, a_k, -1.0, 1.0, sq.geometric_looks(50, n)) for d in data]
    p_pass = np.stack([pp for pp, _ in p], axis=1)
    p_fail = np.stack([pf for _, pf in p], axis=1)
    assert p_pass.shape == (RUNS, k)
    assert sq.holm(p_pass, ALPHA).any(axis=1).mean() <= ALPHA
    assert sq.holm(p_fail, ALPHA).any(axis=1).mean() <= ALPHA
    # without any correction the family errs more often than with it
    assert (p_pass <= ALPHA).any(axis=1).mean() > sq.holm(p_pass, ALPHA).any(axis=1).mean()


# --------------------------------------------------------------------------------------------
# Power and efficiency
# --------------------------------------------------------------------------------------------


@SIMULATION
def test_decides_within_budget():
    budget = 12_800
    looks = sq.geometric_looks(50, budget)
    rng = np.random.default_rng(9)
    lossless = sq.simulate_gate(binary_drops(rng, 1000, budget, 0.0), MARGIN, ALPHA, -1.0, 1.0, looks)
    broken = sq.simulate_gate(binary_drops(rng, 1000, 800, 0.20, discord=0.3), MARGIN, ALPHA, -1.0, 1.0, sq.geometric_looks(50, 800))
    fixed = sq.fixed_n_items(np.sqrt(0.15), MARGIN, ALPHA, 0.9)
    assert 1400 < fixed < 1450
    assert lossless.pass_rate > 0.95 and lossless.mean_items < 2.5 * fixed
    assert broken.fail_rate == 1.0 and broken.mean_items <= 200


# --------------------------------------------------------------------------------------------
# The confidence sequence itself
# --------------------------------------------------------------------------------------------


@SIMULATION
@pytest.mark.parametrize("method", ["betting", "eb", "agrapa"])
def test_cs_covers_true_mean_at_all_times(method):
    # Beta(2, 5) on [0, 1], mean 2/7, every item a look: mu leaves the CS at some t iff one of
    # the two one-sided e-processes at mu ever reaches 2/alpha.
    rng = np.random.default_rng(10)
    x = rng.beta(2, 5, size=(RUNS, 2000))
    p_lo, p_hi = sq.anytime_p_values(x, 2 / 7, ALPHA / 2, 0.0, 1.0, None, method)
    miss = (np.minimum(p_lo, p_hi) <= ALPHA / 2).mean()
    assert miss <= ALPHA
    # direct bounds on a few runs agree with the p-values
    lo, hi = sq.cs_bounds(x[:50], ALPHA, 0.0, 1.0, method)
    inside = (lo < 2 / 7) & (2 / 7 < hi)
    assert (inside == (np.minimum(p_lo[:50], p_hi[:50]) > ALPHA / 2)).all()


def test_cs_shrinks_with_n():
    x = np.random.default_rng(11).random(4000)
    widths = [np.subtract(*reversed(sq.cs_bounds(x[:n], ALPHA))) for n in (100, 400, 1600, 4000)]
    assert (np.diff(widths) < 0).all()
    assert widths[-1] < 0.1


@pytest.mark.parametrize("method", ["betting", "eb", "agrapa"])
def test_cs_symmetric_under_negation(method):
    d = binary_drops(np.random.default_rng(12), 1, 500, 0.05)[0]
    a = sq.confidence_sequence(d, ALPHA, -1.0, 1.0, method)
    b = sq.confidence_sequence(-d, ALPHA, -1.0, 1.0, method)
    assert a.lo == pytest.approx(-b.hi, abs=1e-9) and a.hi == pytest.approx(-b.lo, abs=1e-9)


def test_all_equal_data_narrows_without_nan():
    for method in ("betting", "eb", "agrapa"):
        widths = []
        for n in (10, 100, 1000):
            b = sq.confidence_sequence(np.zeros(n), ALPHA, -1.0, 1.0, method)
            assert np.isfinite([b.lo, b.hi]).all() and b.lo <= 0 <= b.hi
            widths.append(b.hi - b.lo)
        assert widths[0] > widths[1] > widths[2] and widths[2] < 0.05
    dec = sq.decide_drop(np.zeros(2000), MARGIN)
    assert dec.status == "pass" and np.isfinite(dec.hi)


def test_no_items_is_undecided():
    dec = sq.decide_drop(np.array([]), MARGIN)
    assert dec.status == "undecided" and dec.n == 0 and dec.more_items is None
    assert sq.confidence_sequence(np.array([]), ALPHA, -1.0, 1.0).n == 0


def test_rejects_out_of_range():
    with pytest.raises(ValueError):
        sq.decide_drop(np.array([0.5, 1.5]), MARGIN)


def test_looks_less_often_is_never_narrower():
    d = binary_drops(np.random.default_rng(13), 1, 3000, 0.0)[0]
    every = sq.confidence_sequence(d, ALPHA, -1.0, 1.0, looks=None)
    rounds = sq.confidence_sequence(d, ALPHA, -1.0, 1.0, looks=sq.geometric_looks(100, 3000))
    assert rounds.lo <= every.lo + 1e-12 and every.hi <= rounds.hi + 1e-12


# --------------------------------------------------------------------------------------------
# Decisions, multiplicity, sample sizes
# --------------------------------------------------------------------------------------------


def test_decision_agrees_with_bounds():
    rng = np.random.default_rng(14)
    for drop in (-0.02, 0.0, 0.03, 0.06, 0.2):
        d = binary_drops(rng, 1, 3000, drop)[0]
        dec = sq.decide_drop(d, MARGIN, looks=sq.geometric_looks(100, 3000))
        if dec.status == "pass":
            assert dec.hi <= MARGIN + 1e-9 and dec.p_pass <= ALPHA
        elif dec.status == "fail":
            assert dec.lo >= MARGIN - 1e-9 and dec.p_fail <= ALPHA
        else:
            assert dec.lo <= MARGIN <= dec.hi and dec.more_items and dec.more_items > 0
    assert sq.decide_drop(binary_drops(rng, 1, 400, 0.25, 0.3)[0], MARGIN).status == "fail"


def test_more_items_estimate_is_sane():
    # At a true drop of 0 after 400 items, the estimate should land within a few x of the
    # items the gate actually needed on continuation.
    rng = np.random.default_rng(15)
    d = binary_drops(rng, 1, 400, 0.0)[0]
    more = sq.more_items_needed(d, MARGIN, ALPHA)
    assert more is not None and 100 < more < 20_000
    assert sq.more_items_needed(np.zeros(5000), MARGIN, ALPHA) == 0
    assert sq.more_items_needed(np.array([]), MARGIN, ALPHA) is None
    fixed = sq.fixed_n_items(np.sqrt(0.15), MARGIN, ALPHA, 0.9)
    plug = sq.sequential_items(np.sqrt(0.15), MARGIN, ALPHA)
    assert 0.5 * fixed < plug < 3 * fixed


def test_fixed_n_items_formula():
    # ((1.645 + 1.2816) * 0.4 / 0.03)^2 = 1522.6
    assert sq.fixed_n_items(0.4, 0.03, 0.05, 0.9) == 1523
    assert sq.fixed_n_items(0.4, 0.03, 0.05, 0.9, n_checks=4) > 1523
    # above the margin the design must fail with that power: the same n at the mirrored drop
    assert sq.fixed_n_items(0.4, 0.03, 0.05, 0.9, true_drop=0.06) == 1523
    with pytest.raises(ValueError):
        sq.fixed_n_items(0.4, 0.03, true_drop=0.03)


def test_holm_steps_down():
    p = np.array([0.01, 0.04, 0.03, 0.5])
    assert sq.holm(p, 0.05).tolist() == [True, False, False, False]  # 0.03 > 0.05/3
    assert sq.holm(np.array([0.01, 0.02, 0.04]), 0.05).tolist() == [True, True, True]


def test_decide_family_mixed_checks():
    rng = np.random.default_rng(16)
    base, var = binary_pairs(rng, 1, 4000, 0.6, 0.0)
    checks = {
        "mmlu": sq.DropCheck(binary_drops(rng, 1, 4000, 0.0)[0], MARGIN),
        "gsm8k": sq.DropCheck(binary_drops(rng, 1, 1000, 0.25, 0.35)[0], MARGIN),
        "mmlu recovery": sq.RecoveryCheck(base[0], var[0], 0.9),
        "kl": sq.KLCheck(rng.gamma(2.0, 0.01, size=200), 0.05),
    }
    out = sq.decide_family(checks, ALPHA)
    assert out["gsm8k"].status == "fail"
    assert out["kl"].status == "pass" and out["kl"].kind == "kl"
    assert out["mmlu recovery"].status == "pass" and out["mmlu recovery"].lo > 0.9
    assert all(o.alpha == ALPHA / 4 for o in out.values())
    assert "Holm" in out["gsm8k"].reason


def p_pass_by_hand(d, margin, alpha_bets, looks) -> float:
    """A second implementation, item by item from the paper, of the anytime p-value for H0: mean drop >= margin:
    the one-sided PrPl-H capital process of Waudby-Smith & Ramdas (JRSS-B 2024, Thm 3) on x = (d + 1) / 2 at
    m = (margin + 1) / 2, bets sqrt(2 log(1/a) / (sigma2_{t-1} t log(1 + t))) truncated at 1/2 / (1 - m), mean and
    variance regularised by one fake observation (1/2, 1/4); p = 1 / the largest capital seen at a look (at most 1)."""
    m = (margin + 1) / 2
    looks = {t for t in looks if t <= len(d)} | {len(d)}
    total = dev = log_capital = best = 0.0
    sigma2 = 0.25
    for t, v in enumerate(d, start=1):
        x = (v + 1) / 2
        bet = min(math.sqrt(2 * math.log(1 / alpha_bets) / (sigma2 * t * math.log1p(t))), 0.5 / (1 - m))
        log_capital += math.log1p(bet * (m - x))
        if t in looks:
            best = max(best, log_capital)
        total += x
        dev += (x - (0.5 + total) / (t + 1)) ** 2
        sigma2 = (0.25 + dev) / (t + 1)
    return math.exp(-best)


def holm_by_hand(p, alpha) -> list[bool]:
    """Holm (1979): the j-th smallest p-value (j from 0) is rejected while every one so far is <= alpha / (k - j)."""
    rejected = [False] * len(p)
    for j, i in enumerate(sorted(range(len(p)), key=lambda i: p[i])):
        if p[i] > alpha / (len(p) - j):
            break
        rejected[i] = True
    return rejected


# seed 101: p = 0.0011, 0.0183, 0.52: Holm's second step (0.0183 <= alpha/2) passes a check that Bonferroni
# (alpha/3 = 0.0167) would not; seed 25: p = 0.0001, 0.0486, 0.037: uncorrected, all three would pass
@pytest.mark.parametrize("seed,statuses", [(101, ["pass", "pass", "undecided"]), (25, ["pass", "undecided", "undecided"])])
def test_family_uses_the_anytime_p_values_and_holm(seed, statuses):
    rng = np.random.default_rng(seed)
    ds = [binary_drops(rng, 1, 3000, drop)[0] for drop in (0.0, 0.005, 0.01)]
    looks = sq.geometric_looks(100, 3000)
    out = sq.decide_family({str(i): sq.DropCheck(d, MARGIN, looks) for i, d in enumerate(ds)}, ALPHA)
    p = [p_pass_by_hand(d, MARGIN, ALPHA / 3, looks) for d in ds]  # bets tuned at the Bonferroni level
    assert [out[str(i)].p_pass for i in range(3)] == pytest.approx(p, rel=1e-9)
    assert [out[str(i)].status == "pass" for i in range(3)] == holm_by_hand(p, ALPHA)
    assert [out[str(i)].status for i in range(3)] == statuses


def test_recovery_ratio_interval_contains_estimate():
    base, var = binary_pairs(np.random.default_rng(17), 1, 3000, 0.6, 0.03)
    dec = sq.decide_recovery(base[0], var[0], 0.99)
    assert dec.lo <= dec.estimate <= dec.hi and dec.status in ("fail", "undecided")


def test_kl_bca():
    rng = np.random.default_rng(18)
    kl = rng.lognormal(np.log(0.02), 1.0, size=300)
    lo, hi = sq.kl_interval(kl, ALPHA)
    assert lo < kl.mean() < hi
    assert sq.decide_kl(kl, 10 * kl.mean()).status == "pass"
    assert sq.decide_kl(kl, 0.3 * kl.mean()).status == "fail"
    dec = sq.decide_kl(kl, hi)  # at the two-sided 95% upper end: p_pass about 0.025 one-sided
    assert 0.01 < dec.p_pass < 0.05
    assert sq.kl_interval(np.full(10, 0.1), ALPHA) == (0.1, 0.1)


def test_point_estimate_is_labelled_not_a_test():
    dec = sq.point_estimate(np.full(100, 0.01), MARGIN)
    assert dec.status == "pass" and not dec.is_test and "NOT a statistical test" in dec.reason
