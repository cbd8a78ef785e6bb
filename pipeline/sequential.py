"""Anytime-valid, sequential non-inferiority statistics for the deploy gate.

For one (variant, check) pair the gate sees paired per-item values in a seeded random order,
in rounds of growing size, and looks after every round. A check is a one-sided question about
a bounded mean:

- drop:      d_i = base_i - variant_i in [-1, 1];  pass iff mean drop < margin
- recovery:  y_i = variant_i - r * base_i in [-r, 1];  pass iff mean(y) > 0  (variant/base > r)
- KL:        per-window mean KL (fixed n, bootstrap);  pass iff mean KL < threshold

Each check carries two one-sided null hypotheses: H0_pass ("the variant is not good enough",
e.g. drop >= margin; rejecting it passes) and H0_fail ("it is good enough", drop <= margin;
rejecting it fails). Both are tested with e-processes: nonnegative supermartingales under their
null, so by Ville's inequality P(sup_t E_t >= 1/alpha) <= alpha and p_t = 1/sup_{s<=t} E_s is an
anytime-valid p-value. Monitoring after every round and stopping at the first decision is
therefore valid; looking less often than every item only removes chances to err.

Confidence sequences (CS) are the inversion of those e-processes over candidate means:
- "betting": the hedged capital process with predictable plug-in bets (PrPl-H) of
  Waudby-Smith & Ramdas, "Estimating means of bounded random variables by betting",
  JRSS-B 86(1):1-27, 2024 (online 2023; arXiv:2010.09686), Theorem 3.
- "eb": the predictable plug-in empirical-Bernstein CS (PrPl-EB) of the same paper,
  Theorem 2, in the style of Howard, Ramdas, McAuliffe & Sekhon, "Time-uniform,
  nonparametric, nonasymptotic confidence sequences", Ann. Statist. 49(2), 2021.
- "agrapa": the same capital process with WSR23's aGRAPA bets (approximate growth-rate
  adaptive: a plug-in Kelly bet for the gap to the tested mean). Not tuned for CS width but
  for the test at the margin, it decides with fewer items; its CS is a grid inversion.

The hedged process with theta = 1/2 in its max form, max(K+/2, K-/2) >= 1/alpha, rejects
exactly when one of its one-sided halves reaches 2/alpha, so a two-sided (1 - alpha) CS is the
intersection of two one-sided CSs at alpha/2. This module computes the one-sided halves
directly: that is the same CS, and non-inferiority needs exactly one one-sided bound per
decision (each at level alpha, so decisions use the two-sided CS at 2 * alpha).

Multiplicity across a variant's checks (decide_family): Holm's step-down over the anytime
p-values, separately for the k pass hypotheses and the k fail hypotheses, so the probability
of any false pass is <= alpha and of any false fail is <= alpha (Holm 1979, Scand. J. Statist.
6:65-70). The reported bounds use Bonferroni alpha/k, a simultaneous CS.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import ndtr, ndtri

Method = Literal["betting", "eb", "agrapa"]
Status = Literal["pass", "fail", "undecided"]

# c in WSR23: a bet never risks more than half the capital on one item (they suggest 1/2 or 3/4).
TRUNC = 0.5
# Bisection steps for the betting CS bounds: 2**-48 of the range, far below any margin's scale.
_BISECT = 48
# Chunk of simulated runs processed at once, to bound memory ([chunk, n] float64 arrays).
_CHUNK = 512


# --------------------------------------------------------------------------------------------
# Core: predictable bets and e-process paths for observations already mapped to [0, 1]
# --------------------------------------------------------------------------------------------


def _unit(x, lo: float, hi: float) -> np.ndarray:
    """Affine map of observations in [lo, hi] to [0, 1] (the betting CS needs [0, 1])."""
    if not hi > lo:
        raise ValueError(f"need lo < hi, got [{lo}, {hi}]")
    x = np.asarray(x, dtype=float)
    if not np.isfinite(x).all():
        raise ValueError("observations must be finite")
    tol = 1e-9 * (hi - lo)
    if x.size and (x.min() < lo - tol or x.max() > hi + tol):
        raise ValueError(f"observations must lie in [{lo}, {hi}]")
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _look_index(n: int, looks: Sequence[int] | None) -> np.ndarray:
    """0-based positions at which the sequence was inspected: `looks` within 1..n plus n
    itself (we are looking now); every item when looks is None."""
    if looks is None:
        return np.arange(n)
    t = sorted({int(v) for v in looks if 1 <= int(v) <= n} | {n})
    return np.asarray(t, dtype=int) - 1


def _shift(a: np.ndarray, first: float) -> np.ndarray:
    """a_{t-1} along the last axis with a_0 = first: the predictable version of a running stat."""
    out = np.empty_like(a)
    out[..., 0] = first
    out[..., 1:] = a[..., :-1]
    return out


def _bets(x: np.ndarray, alpha_side: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PrPl bets of WSR23: lambda_t = sqrt(2 log(1/a) / (sigma2_{t-1} t log(1+t))),
    with mean and variance regularised by one fake observation (mean 1/2, variance 1/4) so the
    first bets are defined. a is the one-sided level (WSR's log(2/alpha) for a two-sided CS).
    Returns (lambda_t, mu_hat_{t-1}, sigma2_{t-1}), all predictable."""
    t = np.arange(1, x.shape[-1] + 1, dtype=float)
    mu = (0.5 + np.cumsum(x, axis=-1)) / (t + 1)
    sig2 = _shift((0.25 + np.cumsum((x - mu) ** 2, axis=-1)) / (t + 1), 0.25)
    lam = np.sqrt(2 * math.log(1 / alpha_side) / (sig2 * t * np.log1p(t)))
    return lam, _shift(mu, 0.5), sig2


def _log_e(
    x: np.ndarray, m, alpha_side: float, method: Method, bets: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative log e-process paths [..., n] at candidate mean m (a scalar or one per leading
    index): `below` tests H0: mean >= m (it grows when the mean is below m), `above` tests
    H0: mean <= m. Both are nonnegative supermartingales under their whole composite null,
    not only at mean = m: the bets are predictable and nonnegative, so a betting factor has
    conditional mean 1 + l (m - mean) <= 1 for `below` when mean >= m (likewise for `above`),
    and the EB process at m is bounded by the same process at the true mean."""
    lam, mu_prev, sig2_prev = bets if bets is not None else _bets(x, alpha_side)
    m = np.asarray(m, dtype=float)[..., None]
    if method == "betting":
        # Hedged capital process, one-sided halves: K-(m) = prod(1 + l-(m)(m - x)),
        # K+(m) = prod(1 + l+(m)(x - m)); truncation c/(1-m), c/m keeps every factor >= 1 - c.
        with np.errstate(divide="ignore"):
            lam_below = np.minimum(lam, TRUNC / (1 - m))
            lam_above = np.minimum(lam, TRUNC / m)
        below = np.cumsum(np.log1p(lam_below * (m - x)), axis=-1)
        above = np.cumsum(np.log1p(lam_above * (x - m)), axis=-1)
        return below, above
    if method == "eb":
        # PrPl-EB supermartingale exp(sum l(m - x) - sum v psi_E(l)), v = 4(x - mu_{t-1})^2,
        # psi_E(l) = (-log(1 - l) - l)/4; bets truncated at c so psi_E is finite.
        lam = np.minimum(lam, TRUNC)
        pen = np.cumsum((x - mu_prev) ** 2 * (-np.log1p(-lam) - lam), axis=-1)
        s_lam = np.cumsum(lam, axis=-1)
        s_lx = np.cumsum(lam * x, axis=-1)
        return m * s_lam - s_lx - pen, s_lx - m * s_lam - pen
    if method == "agrapa":
        # aGRAPA bets (WSR23, approximate growth-rate adaptive): the Kelly bet for the observed
        # gap, (mu_{t-1} - m) / (sigma2_{t-1} + (mu_{t-1} - m)^2), only on the side the data
        # point to, truncated like PrPl-H. Tuned to the tested mean rather than to CS width,
        # so a test at the margin stops sooner; the bets depend on m, so the CS is a grid.
        gap = mu_prev - m
        kelly = gap / (sig2_prev + gap**2)
        with np.errstate(divide="ignore"):
            lam_below = np.clip(-kelly, 0.0, TRUNC / (1 - m))
            lam_above = np.clip(kelly, 0.0, TRUNC / m)
        below = np.cumsum(np.log1p(lam_below * (m - x)), axis=-1)
        above = np.cumsum(np.log1p(lam_above * (x - m)), axis=-1)
        return below, above
    raise ValueError(f"unknown method {method!r} (betting, eb or agrapa)")


def _bounds01(x: np.ndarray, idx: np.ndarray, alpha_side: float, method: Method) -> tuple[np.ndarray, np.ndarray]:
    """One-sided level-alpha_side lower and upper bounds on the mean of x in [0, 1] ([..., n]),
    intersected over the inspection positions idx. Outward-rounded where bisected."""
    thr = math.log(1 / alpha_side)
    bets = _bets(x, alpha_side)
    if method == "agrapa":
        return _grid_bounds01(x, idx, alpha_side, bets)
    if method == "eb":
        lam = np.minimum(bets[0], TRUNC)
        pen = np.cumsum((x - bets[1]) ** 2 * (-np.log1p(-lam) - lam), axis=-1)[..., idx]
        s_lam = np.cumsum(lam, axis=-1)[..., idx]
        s_lx = np.cumsum(lam * x, axis=-1)[..., idx]
        lo = ((s_lx - thr - pen) / s_lam).max(axis=-1)
        hi = ((s_lx + thr + pen) / s_lam).min(axis=-1)
        return np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)
    # Betting: log K-_t(m) is nondecreasing in m and log K+_t(m) nonincreasing (each factor is,
    # including through the m-dependent truncation), so sup_t over the looks is monotone too and
    # the running-intersection bound is a root we can bisect for, exactly, at any n.
    shape = x.shape[:-1]
    # upper: smallest m with sup_t log K-_t(m) >= thr (K-(0) <= 1 is never rejected; 1 if none)
    a, b = np.zeros(shape), np.ones(shape)
    # lower: largest m with sup_t log K+_t(m) >= thr (K+(1) <= 1 is never rejected; 0 if none)
    c, d = np.zeros(shape), np.ones(shape)
    for _ in range(_BISECT):
        mid_u, mid_l = (a + b) / 2, (c + d) / 2
        below, _ = _log_e(x, mid_u, alpha_side, method, bets)
        rej_u = below[..., idx].max(axis=-1) >= thr
        b, a = np.where(rej_u, mid_u, b), np.where(rej_u, a, mid_u)
        _, above = _log_e(x, mid_l, alpha_side, method, bets)
        rej_l = above[..., idx].max(axis=-1) >= thr
        c, d = np.where(rej_l, mid_l, c), np.where(rej_l, d, mid_l)
    return c, b


# Candidate means for CSs whose bets depend on the candidate (aGRAPA): step 1/1000 of the range.
_GRID = np.linspace(0.0, 1.0, 1001)


def _grid_bounds01(
    x: np.ndarray, idx: np.ndarray, alpha_side: float, bets: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Grid inversion (WSR23's method for candidate-dependent bets): a candidate is rejected
    below (above) once its `below` (`above`) e-process reaches 1/alpha_side at a look; the
    bounds are the hull of the survivors widened by one grid step, so they stay conservative
    even where the surviving set is not an interval. An empty set gives NaN bounds."""
    thr = math.log(1 / alpha_side)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    fb = [b.reshape(flat.shape) for b in bets]
    lo, hi = np.empty(flat.shape[0]), np.empty(flat.shape[0])
    step = _GRID[1] - _GRID[0]
    for r in range(flat.shape[0]):
        keep_lo = np.empty(_GRID.size, dtype=bool)
        keep_hi = np.empty(_GRID.size, dtype=bool)
        for s in range(0, _GRID.size, 128):
            g = _GRID[s : s + 128]
            below, above = _log_e(flat[r], g, alpha_side, "agrapa", tuple(b[r] for b in fb))
            keep_hi[s : s + 128] = below[:, idx].max(axis=1) < thr
            keep_lo[s : s + 128] = above[:, idx].max(axis=1) < thr
        keep = keep_lo & keep_hi
        if keep.any():
            lo[r] = max(0.0, _GRID[keep][0] - step)
            hi[r] = min(1.0, _GRID[keep][-1] + step)
        else:
            lo[r] = hi[r] = np.nan
    return lo.reshape(lead), hi.reshape(lead)


# --------------------------------------------------------------------------------------------
# Confidence sequences
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """A CS read at the last look: running intersection over all looks so far."""

    lo: float
    hi: float
    n: int
    mean: float


def cs_bounds(
    x: np.ndarray, alpha: float = 0.05, lo: float = 0.0, hi: float = 1.0, method: Method = "betting", looks: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised confidence_sequence: x is [..., n] (e.g. [runs, n]); returns the lower and
    upper ends, each [...], of the two-sided (1 - alpha) CS at the last look."""
    x01 = _unit(x, lo, hi)
    if x01.shape[-1] == 0:
        full = np.ones(x01.shape[:-1])
        return lo * full, hi * full
    idx = _look_index(x01.shape[-1], looks)
    lo01, hi01 = _bounds01(x01, idx, alpha / 2, method)
    return lo + (hi - lo) * lo01, lo + (hi - lo) * hi01


def confidence_sequence(
    x: np.ndarray, alpha: float = 0.05, lo: float = 0.0, hi: float = 1.0, method: Method = "betting", looks: Sequence[int] | None = None
) -> Bounds:
    """Two-sided (1 - alpha) anytime-valid CS for the mean of x (1-D, in [lo, hi], arrival
    order): P(exists t: mean not in CS_t) <= alpha. `looks` are the cumulative counts at which
    it was inspected (default: every item); the result is the running intersection at the
    last one. method "betting" = PrPl-H (WSR23 Thm 3), "eb" = PrPl-EB (WSR23 Thm 2),
    "agrapa" = hedged capital with aGRAPA bets (WSR23; grid of 1,001 candidates)."""
    x = np.asarray(x, dtype=float)
    if x.ndim != 1:
        raise ValueError("confidence_sequence takes one sequence; use cs_bounds for [runs, n]")
    if x.size == 0:
        return Bounds(float(lo), float(hi), 0, float("nan"))
    a, b = cs_bounds(x, alpha, lo, hi, method, looks)
    return Bounds(float(a), float(b), x.size, float(x.mean()))


def anytime_p_values(
    x: np.ndarray, threshold: float, alpha_bets: float, lo: float, hi: float, looks: Sequence[int] | None = None, method: Method = "betting"
) -> tuple[np.ndarray, np.ndarray]:
    """Anytime-valid p-values p_t = min(1, 1/sup_{looks} E) at the last look, for
    H0: mean >= threshold (small when the mean is below it) and H0: mean <= threshold.
    x is [..., n]; alpha_bets tunes the bets (the level the test will mostly be read at) and
    does not affect validity."""
    x01 = _unit(x, lo, hi)
    n = x01.shape[-1]
    if n == 0:
        one = np.ones(x01.shape[:-1])
        return one, one.copy()
    m = (threshold - lo) / (hi - lo)
    idx = _look_index(n, looks)
    below, above = _log_e(x01, m, alpha_bets, method)
    p_below = np.exp(-np.maximum(below[..., idx].max(axis=-1), 0.0))
    p_above = np.exp(-np.maximum(above[..., idx].max(axis=-1), 0.0))
    return p_below, p_above


# --------------------------------------------------------------------------------------------
# Sequential simulation (vectorised across runs; the tests and benchmarks use it)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimResult:
    """Outcome of many simulated sequential checks, each stopped at its first decision."""

    status: np.ndarray  # [runs] int8: +1 pass, -1 fail, 0 undecided at the budget
    n_used: np.ndarray  # [runs] items consumed when it stopped (the budget if undecided)

    @property
    def pass_rate(self) -> float:
        return float((self.status == 1).mean())

    @property
    def fail_rate(self) -> float:
        return float((self.status == -1).mean())

    @property
    def undecided_rate(self) -> float:
        return float((self.status == 0).mean())

    @property
    def mean_items(self) -> float:
        return float(self.n_used.mean())


def geometric_looks(first: int, budget: int, factor: float = 2.0) -> list[int]:
    """Cumulative item counts at the end of each round: first, first*factor, ... capped at and
    ending with budget (rounds of geometrically growing size)."""
    if first < 1 or budget < 1 or factor <= 1:
        raise ValueError("need first >= 1, budget >= 1, factor > 1")
    out, n = [], float(first)
    while n < budget:
        out.append(round(n))
        n *= factor
    out.append(int(budget))
    return sorted(set(out))


def simulate_gate(
    x: np.ndarray,
    threshold: float,
    alpha: float,
    lo: float,
    hi: float,
    looks: Sequence[int] | None = None,
    method: Method = "betting",
    pass_below: bool = True,
) -> SimResult:
    """Run the sequential check on each row of x ([runs, n], n = the budget): after each look,
    pass when H0_pass is rejected at level alpha, fail when H0_fail is, stop at the first
    decision. pass_below: passing means the mean is below threshold (drop); False for
    recovery, where passing means the mean is above it."""
    x = np.atleast_2d(np.asarray(x, dtype=float))
    runs, n = x.shape
    idx = _look_index(n, looks)
    thr = math.log(1 / alpha)
    status = np.zeros(runs, dtype=np.int8)
    n_used = np.full(runs, n, dtype=int)
    m = (threshold - lo) / (hi - lo)
    for s in range(0, runs, _CHUNK):
        below, above = _log_e(_unit(x[s : s + _CHUNK], lo, hi), m, alpha, method)
        hit_pass = (below if pass_below else above)[:, idx] >= thr
        hit_fail = (above if pass_below else below)[:, idx] >= thr
        never = len(idx)
        first_pass = np.where(hit_pass.any(axis=1), hit_pass.argmax(axis=1), never)
        first_fail = np.where(hit_fail.any(axis=1), hit_fail.argmax(axis=1), never)
        first = np.minimum(first_pass, first_fail)
        # Both halves crossing at one look is practically impossible (PrPl-H/EB: their product
        # is <= 1 for equal bets; aGRAPA bets on one side at a time); a tie counts as a pass
        # so that a simulated false-pass rate is never understated.
        st = np.where(first_pass <= first_fail, 1, -1)
        st[first == never] = 0
        status[s : s + _CHUNK] = st
        n_used[s : s + _CHUNK] = np.where(first < never, idx[np.minimum(first, never - 1)] + 1, n)
    return SimResult(status, n_used)


# --------------------------------------------------------------------------------------------
# Multiplicity
# --------------------------------------------------------------------------------------------


def holm(p: np.ndarray, alpha: float) -> np.ndarray:
    """Holm's step-down over the last axis: sort the p-values, reject the j-th smallest while
    every p_(i) <= alpha / (k - i + 1) for i <= j. Valid for anytime p-values read at any time:
    running-min p-values only fall, Holm is monotone in them, and the first false rejection
    needs some true null's p <= alpha / #true nulls."""
    p = np.asarray(p, dtype=float)
    k = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    ok = np.take_along_axis(p, order, axis=-1) <= alpha / (k - np.arange(k))
    ok = np.logical_and.accumulate(ok, axis=-1)
    rej = np.empty_like(ok)
    np.put_along_axis(rej, order, ok, axis=-1)
    return rej


# --------------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckDecision:
    """One check's verdict. lo and hi are each one-sided level-`alpha` bounds on `estimate`'s
    scale (so [lo, hi] is a (1 - 2 alpha) CS; alpha is after Bonferroni over the family)."""

    status: Status
    kind: Literal["drop", "recovery", "kl", "point"]
    estimate: float  # mean drop (base - variant), recovery ratio variant/base, or mean KL
    lo: float
    hi: float
    threshold: float  # margin, min_ratio or max KL
    n: int  # items (or KL windows) used
    alpha: float
    p_pass: float  # p-value of H0_pass (anytime-valid for sequential checks)
    p_fail: float  # p-value of H0_fail
    more_items: int | None  # undecided sequential checks: estimated extra items to decide
    reason: str
    is_test: bool = True  # False only for the point-estimate mode


@dataclass(frozen=True, eq=False)
class DropCheck:
    """Per-item drops d = base - variant in [-1, 1], arrival order; pass iff mean < margin."""

    d: np.ndarray
    margin: float
    looks: Sequence[int] | None = None


@dataclass(frozen=True, eq=False)
class RecoveryCheck:
    """Paired per-item scores in [0, 1]; pass iff mean(variant) / mean(base) > min_ratio."""

    base: np.ndarray
    variant: np.ndarray
    min_ratio: float
    looks: Sequence[int] | None = None


@dataclass(frozen=True, eq=False)
class KLCheck:
    """Per-window mean KL (nats), fixed n; pass iff mean KL < threshold (BCa bootstrap)."""

    per_window_kl: np.ndarray
    threshold: float
    seed: int = 0


@dataclass(frozen=True)
class _Evidence:
    kind: Literal["drop", "recovery", "kl"]
    estimate: float
    lo: float
    hi: float
    threshold: float
    n: int
    p_pass: float
    p_fail: float
    more_items: int | None


def _drop_evidence(c: DropCheck, alpha_side: float, method: Method) -> _Evidence:
    d = np.asarray(c.d, dtype=float)
    n = d.size
    if not -1 < c.margin < 1:
        raise ValueError(f"margin must lie in (-1, 1), got {c.margin}")
    p_pass, p_fail = anytime_p_values(d, c.margin, alpha_side, -1.0, 1.0, c.looks, method)
    if n:
        lo, hi = cs_bounds(d, 2 * alpha_side, -1.0, 1.0, method, c.looks)
        more = more_items_needed(d, c.margin, alpha_side, method)
    else:
        lo, hi, more = -1.0, 1.0, None
    return _Evidence("drop", float(d.mean()) if n else float("nan"), float(lo), float(hi), c.margin, n, float(p_pass), float(p_fail), more)


def _recovery_y(base: np.ndarray, variant: np.ndarray, r: float) -> tuple[np.ndarray, float, float]:
    """y = variant - r * base in [-r, 1]; mean(y) > 0 iff the recovery ratio exceeds r."""
    return variant - r * base, -r, 1.0


# Candidate ratios for the displayed recovery interval; the decision itself is tested at
# min_ratio exactly, so this grid only limits the display's resolution.
_RATIO_GRID = np.linspace(0.0, 2.0, 401)


def _recovery_evidence(c: RecoveryCheck, alpha_side: float, method: Method) -> _Evidence:
    b = np.asarray(c.base, dtype=float)
    v = np.asarray(c.variant, dtype=float)
    if b.shape != v.shape or b.ndim != 1:
        raise ValueError("base and variant must be 1-D and paired item by item")
    if not c.min_ratio > 0:
        raise ValueError(f"min_ratio must be > 0, got {c.min_ratio}")
    _unit(b, 0.0, 1.0)  # validates: scores must lie in [0, 1]
    _unit(v, 0.0, 1.0)
    n = b.size
    y, lo, hi = _recovery_y(b, v, c.min_ratio)
    # passing = mean(y) above 0: H0_pass is "mean(y) <= 0", tested by the `above` e-process
    p_below, p_above = anytime_p_values(y, 0.0, alpha_side, lo, hi, c.looks, method)
    if n == 0:
        return _Evidence("recovery", float("nan"), 0.0, float("inf"), c.min_ratio, 0, 1.0, 1.0, None)
    # Ratio CS by duality: R is in it iff 0 is in the CS of mean(variant - R base). Each
    # candidate r is tested at 0 on its own affine map to [0, 1]; the hull is reported.
    r = _RATIO_GRID[:, None]
    x01 = (v - r * b + r) / (1 + r)
    below, above = _log_e(x01, r[:, 0] / (1 + r[:, 0]), alpha_side, method)
    idx = _look_index(n, c.looks)
    thr = math.log(1 / alpha_side)
    keep = (below[:, idx].max(axis=1) < thr) & (above[:, idx].max(axis=1) < thr)
    step = _RATIO_GRID[1] - _RATIO_GRID[0]
    if keep.any():
        ks = _RATIO_GRID[keep]
        r_lo = max(0.0, ks[0] - step) if ks[0] > 0 else 0.0
        r_hi = ks[-1] + step if ks[-1] < _RATIO_GRID[-1] else float("inf")
    else:  # every candidate rejected: the CS is empty here (a rare miss), so NaN bounds
        r_lo = r_hi = float("nan")
    est = float(v.mean() / b.mean()) if b.mean() > 0 else float("nan")
    more = _more_items(_unit(y, lo, hi), (0.0 - lo) / (hi - lo), alpha_side, method)
    return _Evidence("recovery", est, float(r_lo), float(r_hi), c.min_ratio, n, float(p_above), float(p_below), more)


def _kl_evidence(c: KLCheck, alpha_side: float) -> _Evidence:
    kl = np.asarray(c.per_window_kl, dtype=float)
    lo, hi, p_pass, p_fail = _bca(kl, c.threshold, alpha_side, c.seed)
    return _Evidence("kl", float(kl.mean()) if kl.size else float("nan"), lo, hi, c.threshold, kl.size, p_pass, p_fail, None)


def decide_family(
    checks: Mapping[str, DropCheck | RecoveryCheck | KLCheck], alpha: float = 0.05, method: Method = "betting"
) -> dict[str, CheckDecision]:
    """Decide every check of one variant with family-wise error control: P(any false pass)
    <= alpha and P(any false fail) <= alpha, at every look (Holm over the anytime p-values of
    the k pass hypotheses, and separately of the k fail hypotheses). Bets are tuned and bounds
    reported at the Bonferroni level alpha/k. Feed each check all its items so far; a check
    already decided should stop collecting items (its decision does not change)."""
    if not checks:
        return {}
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    k = len(checks)
    a_k = alpha / k
    ev: dict[str, _Evidence] = {}
    for name, c in checks.items():
        if isinstance(c, DropCheck):
            ev[name] = _drop_evidence(c, a_k, method)
        elif isinstance(c, RecoveryCheck):
            ev[name] = _recovery_evidence(c, a_k, method)
        elif isinstance(c, KLCheck):
            ev[name] = _kl_evidence(c, a_k)
        else:
            raise TypeError(f"check {name!r}: expected DropCheck, RecoveryCheck or KLCheck, got {type(c).__name__}")
    names = list(ev)
    rej_pass = holm(np.array([ev[s].p_pass for s in names]), alpha)
    rej_fail = holm(np.array([ev[s].p_fail for s in names]), alpha)
    out: dict[str, CheckDecision] = {}
    for i, s in enumerate(names):
        e = ev[s]
        status: Status = "undecided"
        if rej_pass[i] and rej_fail[i]:
            reason = (
                "conflicting evidence: both one-sided nulls were rejected at different looks; "
                "the check should have stopped at its first decision"
            )
        elif rej_pass[i]:
            status, reason = "pass", _reason(e, "pass", alpha, k)
        elif rej_fail[i]:
            status, reason = "fail", _reason(e, "fail", alpha, k)
        else:
            reason = _reason(e, "undecided", alpha, k)
        more = e.more_items if status == "undecided" else None
        out[s] = CheckDecision(status, e.kind, e.estimate, e.lo, e.hi, e.threshold, e.n, a_k, e.p_pass, e.p_fail, more, reason)
    return out


def _reason(e: _Evidence, status: str, alpha: float, k: int) -> str:
    what = {"drop": "mean drop", "recovery": "recovery ratio", "kl": "mean KL"}[e.kind]
    level = f"alpha={alpha:g}" + (f" over {k} checks (Holm)" if k > 1 else "")
    interval = ("BCa CI " if e.kind == "kl" else "CS ") + f"[{e.lo:.4g}, {e.hi:.4g}]"
    if e.n == 0:
        return "no items yet"
    good = "above" if e.kind == "recovery" else "below"
    bad = "below" if e.kind == "recovery" else "above"
    # Holm's later steps reject at alpha/(k-j) > alpha/k, so the Bonferroni CS shown can still
    # contain the threshold; say so rather than look inconsistent.
    note = "; Holm step-down, beyond the Bonferroni CS shown" if e.lo <= e.threshold <= e.hi else ""
    if status == "pass":
        return f"{what} {e.estimate:.4g}, {interval}: confidently {good} {e.threshold:g} ({level}, p={e.p_pass:.3g}{note})"
    if status == "fail":
        return f"{what} {e.estimate:.4g}, {interval}: confidently {bad} {e.threshold:g} ({level}, p={e.p_fail:.3g}{note})"
    tail = f"; about {e.more_items} more items would decide" if e.more_items else ""
    return f"{what} {e.estimate:.4g}, {interval} still contains {e.threshold:g} after {e.n} ({level}){tail}"


def decide_drop(
    d: np.ndarray, margin: float, alpha: float = 0.05, looks: Sequence[int] | None = None, method: Method = "betting"
) -> CheckDecision:
    """Non-inferiority of one check on its own: pass iff the anytime upper bound of the mean
    drop is below margin, fail iff the lower bound is above it, else undecided (with an
    estimate of the items still needed). Each error <= alpha, however often it was looked at."""
    return decide_family({"drop": DropCheck(np.asarray(d, dtype=float), margin, looks)}, alpha, method)["drop"]


def decide_recovery(
    base: np.ndarray,
    variant: np.ndarray,
    min_ratio: float,
    alpha: float = 0.05,
    looks: Sequence[int] | None = None,
    method: Method = "betting",
) -> CheckDecision:
    """Recovery mean(variant)/mean(base) >= min_ratio, tested as mean(variant - r base) > 0 with
    the same anytime CS machinery (the differences lie in [-r, 1]); lo/hi is a ratio CS."""
    check = RecoveryCheck(np.asarray(base, dtype=float), np.asarray(variant, dtype=float), min_ratio, looks)
    return decide_family({"recovery": check}, alpha, method)["recovery"]


def decide_kl(per_window_kl: np.ndarray, threshold: float, alpha: float = 0.05, seed: int = 0) -> CheckDecision:
    """Mean KL below threshold, fixed n (not sequential): one-sided BCa bootstrap bounds."""
    return decide_family({"kl": KLCheck(np.asarray(per_window_kl, dtype=float), threshold, seed)}, alpha)["kl"]


def point_estimate(d: np.ndarray, margin: float) -> CheckDecision:
    """The observed mean drop against the margin, with no uncertainty at all. NOT a test: it
    passes about half of the variants whose true drop equals the margin. Explicit opt-in only."""
    d = np.asarray(d, dtype=float)
    if d.size == 0:
        return CheckDecision(
            "undecided",
            "point",
            float("nan"),
            float("nan"),
            float("nan"),
            margin,
            0,
            float("nan"),
            float("nan"),
            float("nan"),
            None,
            "no items; point-estimate mode (NOT a statistical test)",
            is_test=False,
        )
    est = float(d.mean())
    status: Status = "pass" if est < margin else "fail"
    return CheckDecision(
        status,
        "point",
        est,
        float("nan"),
        float("nan"),
        margin,
        d.size,
        float("nan"),
        float("nan"),
        float("nan"),
        None,
        f"point estimate {est:.4g} vs margin {margin:g}: NOT a statistical test, no error-rate guarantee",
        is_test=False,
    )


# --------------------------------------------------------------------------------------------
# KL: fixed-n BCa bootstrap
# --------------------------------------------------------------------------------------------


def _bca(x: np.ndarray, threshold: float, alpha_side: float, seed: int, n_boot: int = 10_000) -> tuple[float, float, float, float]:
    """One-sided level-alpha_side BCa bounds on the mean and the BCa p-values of
    H0: mean >= threshold (pass) and H0: mean <= threshold (fail) (Efron 1987, JASA 82:171).
    BCa corrects the skew of per-window KL that a plain percentile interval ignores."""
    n = x.size
    if n < 2:
        return float("nan"), float("nan"), 1.0, 1.0
    mean = float(x.mean())
    if np.ptp(x) == 0:  # every window identical: the bootstrap law is a point mass
        return mean, mean, float(mean >= threshold), float(mean <= threshold)
    rng = np.random.default_rng(seed)
    boots = np.sort(x[rng.integers(0, n, size=(n_boot, n))].mean(axis=1))
    eps = 0.5 / n_boot
    z0 = ndtri(np.clip(((boots < mean).sum() + 0.5 * (boots == mean).sum()) / n_boot, eps, 1 - eps))
    jack = (x.sum() - x) / (n - 1)
    dev = jack.mean() - jack
    denom = 6 * (dev**2).sum() ** 1.5
    acc = float((dev**3).sum() / denom) if denom > 0 else 0.0

    def bound(z: float) -> float:
        u = z0 + z
        level = ndtr(z0 + u / (1 - acc * u))
        return float(np.quantile(boots, np.clip(level, 0.0, 1.0)))

    z = ndtri(1 - alpha_side)
    lo, hi = bound(-z), bound(z)
    # Invert the BCa map at the threshold: the level q = G(threshold) of the bootstrap law is
    # reached by z* with z0 + u/(1 - a u) = ndtri(q), u = z0 + z*; then p_pass = 1 - Phi(z*).
    q = np.clip(np.searchsorted(boots, threshold, side="right") / n_boot, eps, 1 - eps)
    w = ndtri(q) - z0
    u = w / (1 + acc * w) if 1 + acc * w > 0 else math.copysign(math.inf, w)
    p_pass = float(ndtr(-(u - z0)))
    return lo, hi, p_pass, 1.0 - p_pass


def kl_interval(per_window_kl: np.ndarray, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Two-sided (1 - alpha) BCa bootstrap interval for the mean of per-window KLs. Fixed n:
    valid once, at the end, not under repeated looks (KL is computed in one pass anyway)."""
    lo, hi, _, _ = _bca(np.asarray(per_window_kl, dtype=float), 0.0, alpha / 2, seed)
    return lo, hi


# --------------------------------------------------------------------------------------------
# Sample sizes
# --------------------------------------------------------------------------------------------


def fixed_n_items(sd: float, margin: float, alpha: float = 0.05, power: float = 0.9, true_drop: float = 0.0, n_checks: int = 1) -> int:
    """Items a fixed-n paired design needs to decide correctly with probability `power` when the
    true mean drop is true_drop: pass below the margin, fail above it (one-sided z-tests at
    alpha/n_checks, Bonferroni; normal approximation), n = ((z_{1-alpha/k} + z_{power}) sd / |margin - true_drop|)^2."""
    if margin == true_drop:
        raise ValueError("no design decides with high probability when the true drop is on the margin")
    z = ndtri(1 - alpha / n_checks) + ndtri(power)
    return math.ceil((z * sd / abs(margin - true_drop)) ** 2)


def _expected_crossing(
    cur: float, n0: int, support: np.ndarray, m: float, alpha_side: float, method: Method, cap: int = 10_000_000
) -> int | None:
    """Items after n0 until the e-process at m, now at log value cur, is expected to reach
    log(1/alpha_side) when future items follow the equally weighted law `support` (in [0, 1]):
    the sum over t > n0 of E log(1 + l_t (m - X)) (betting; the EB analogue for "eb") with the
    plug-in bet l_t at the law's variance. Deterministic; None if not within cap items."""
    thr = math.log(1 / alpha_side)
    if cur >= thr:
        return 0
    mu, var = float(support.mean()), float(support.var())
    if mu == m:
        return None
    go_below = mu < m
    t = n0 + np.unique(np.round(np.geomspace(1, cap, 800)))
    sig2 = (0.25 + (t - 1) * var) / t  # the regularised variance the bet at t sees
    lam = np.sqrt(2 * math.log(1 / alpha_side) / (sig2 * t * np.log1p(t)))
    step = (m - support) if go_below else (support - m)
    if method in ("betting", "agrapa"):
        if method == "agrapa":  # the Kelly bet for the law's gap, constant once learned
            lam = np.full_like(t, abs(m - mu) / (var + (m - mu) ** 2), dtype=float)
        with np.errstate(divide="ignore"):
            lam = np.minimum(lam, TRUNC / (1 - m) if go_below else TRUNC / m)
        g = np.log1p(lam[:, None] * step[None, :]).mean(axis=1)
    else:
        lam = np.minimum(lam, TRUNC)
        g = lam * abs(m - mu) - var * (-np.log1p(-lam) - lam)
    # the per-item growth g varies slowly in t: integrate it over the geometric grid
    total = cur + g[0] + np.concatenate([[0.0], np.cumsum((g[1:] + g[:-1]) / 2 * np.diff(t))])
    hit = np.flatnonzero(total >= thr)
    if hit.size == 0:
        return None
    j = hit[0]
    if j == 0:
        return 1
    frac = (thr - total[j - 1]) / (total[j] - total[j - 1])
    return math.ceil(t[j - 1] + frac * (t[j] - t[j - 1]) - n0)


def _more_items(x: np.ndarray, m: float, alpha_side: float, method: Method) -> int | None:
    """Extra items until the CS at the observed law excludes m (x, m in [0, 1]): continue the
    e-process on the side the observed mean points to, from its current value, with future
    items drawn from the observed values (compressed to 256 quantiles). A plug-in estimate,
    not a promise: the observed mean is itself noisy."""
    n = x.size
    if n == 0 or x.mean() == m:
        return None
    below, above = _log_e(x, m, alpha_side, method)
    cur = float((below if x.mean() < m else above)[-1])
    support = np.quantile(x, (np.arange(256) + 0.5) / 256) if n > 256 else x
    return _expected_crossing(cur, n, support, m, alpha_side, method)


def more_items_needed(d: np.ndarray, margin: float, alpha: float = 0.05, method: Method = "betting") -> int | None:
    """For a drop check: estimated extra items until the CS at the observed mean and variance
    excludes the margin (0 if it already does; None without data, with mean exactly at the
    margin, or beyond ten million items). alpha is the one-sided level of the decision."""
    d = np.asarray(d, dtype=float)
    return _more_items(_unit(d, -1.0, 1.0), (margin + 1) / 2, alpha, method)


def sequential_items(
    sd: float, margin: float, alpha: float = 0.05, true_drop: float = 0.0, n_checks: int = 1, method: Method = "betting"
) -> int | None:
    """Plug-in estimate of the items the sequential check needs to decide when the mean drop is
    true_drop with per-item SD sd: the expected-growth continuation from zero items of the
    two-point law true_drop +- sd (right mean and variance), looks after every item. Use
    simulate_gate for the distribution and the overshoot of coarser rounds."""
    pts = _unit(np.clip([true_drop - sd, true_drop + sd], -1.0, 1.0), -1.0, 1.0)
    return _expected_crossing(0.0, 0, pts, (margin + 1) / 2, alpha / n_checks, method)
