"""Items the sequential non-inferiority gate uses, against a fixed-n design, by simulation.

    .venv/bin/python benchmarks/sample_size.py            # ~5 min on 2 shared CPU cores
    .venv/bin/python benchmarks/sample_size.py --runs 500 # a quicker, noisier pass

For each scenario (a per-item law of the drop d = base - variant) and each CS method, 2,000
seeded runs are monitored after every round (cumulative looks 50, 100, 200, ... "x2",
50, 62, 78, ... "x1.25", or after every item, up to the budget) and stop at the first decision. Printed per row:
P(pass), P(fail), P(undecided at the budget), mean and median items used, and the mean as a
fraction of the fixed-n design's items: the n a one-sided z-test at alpha needs for 90% power
to pass a lossless variant (what one would plan without knowing the true drop), and, for
drops below the margin, the n planned for that very drop. Then the error rates at the margin
(the tests' numbers) next to naive peeking and the old straddle rule. Markdown tables,
pasted into docs/statistics.md.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from pipeline import sequential as sq

ALPHA, MARGIN, POWER = 0.05, 0.03, 0.9
BUDGET = 12_800


def binary(rng, runs, n, drop, discord):
    """Paired 0/1 items (MMLU-like): flips base-right/variant-wrong minus the reverse = drop."""
    p10, p01 = (discord + drop) / 2, (discord - drop) / 2
    u = rng.random((runs, n))
    return np.where(u < p10, 1.0, np.where(u < p10 + p01, -1.0, 0.0))


def mc2(rng, runs, n, drop, w=0.3):
    """TruthfulQA-MC2-like per-item probabilities, strongly paired (SD of d about 0.085)."""
    base = rng.beta(2.25, 2.75, size=(runs, n))
    mz = 0.45 - drop / w
    return w * (base - rng.beta(5 * mz, 5 * (1 - mz), size=(runs, n)))


SCENARIOS = [
    # name, generator, true drop, discordance (binary only). A broken variant flips more items.
    ("binary, broken (drop 20 pts)", binary, 0.20, 0.30),
    ("binary, lossless (drop 0)", binary, 0.00, 0.15),
    ("binary, small loss (1 pt)", binary, 0.01, 0.15),
    ("MC2, lossless (drop 0)", mc2, 0.00, None),
    ("MC2, small loss (1 pt)", mc2, 0.01, None),
]
# The fixed-n design is planned before the data, for a lossless variant of the family.
PLANNED_SD = {binary: math.sqrt(0.15), mc2: None}


def draw(gen, rng, runs, n, drop, discord):
    return gen(rng, runs, n, drop, discord) if discord is not None else gen(rng, runs, n, drop)


def naive_peek(d, looks, margin):
    idx = np.asarray(looks) - 1
    t = np.arange(1, d.shape[1] + 1)[idx]
    mean = np.cumsum(d, axis=1)[:, idx] / t
    var = np.cumsum(d**2, axis=1)[:, idx] / t - mean**2
    return float((mean + 1.6448536 * np.sqrt(var / (t - 1)) < margin).any(axis=1).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--methods", default="betting,eb,agrapa")
    args = ap.parse_args()
    methods = args.methods.split(",")
    schedules = {"x2": sq.geometric_looks(50, BUDGET, 2.0), "x1.25": sq.geometric_looks(50, BUDGET, 1.25), "every item": None}
    t0 = time.time()

    print(f"alpha={ALPHA} (one-sided, per decision), margin={MARGIN}, budget={BUDGET}, runs={args.runs}\n")
    print(
        "| scenario | SD of d | method | rounds | P(pass) | P(fail) | undecided | mean items | median | "
        "mean / fixed-n(δ=0) | mean / fixed-n(δ) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fixed_rows = []
    ratios: dict[tuple[str, str], list[float]] = {}
    for si, (name, gen, drop, discord) in enumerate(SCENARIOS):
        d = draw(gen, np.random.default_rng(100 + si), args.runs, BUDGET, drop, discord)
        sd = float(d.std())
        sd0 = PLANNED_SD[gen] or float(mc2(np.random.default_rng(0), 1, 200_000, 0.0).std())
        n0 = sq.fixed_n_items(sd0, MARGIN, ALPHA, POWER, 0.0)
        nd = sq.fixed_n_items(sd, MARGIN, ALPHA, POWER, drop) if drop < MARGIN else None
        # the fixed-n(δ=0) design's own outcome here: one-sided z-test on the first n0 items
        head = d[:, :n0]
        se = head.std(axis=1, ddof=1) / math.sqrt(n0)
        fixed_rows.append(
            (name, n0, float((head.mean(1) + 1.6448536 * se < MARGIN).mean()), float((head.mean(1) - 1.6448536 * se > MARGIN).mean()))
        )
        for method in methods:
            for sched, looks in schedules.items():
                r = sq.simulate_gate(d, MARGIN, ALPHA, -1.0, 1.0, looks, method)
                rel0 = r.mean_items / n0
                ratios.setdefault((method, sched), []).append(rel0) if name.startswith("binary") else None
                reld = f"{r.mean_items / nd:.2f} (n={nd})" if nd else "n/a"
                print(
                    f"| {name} | {sd:.3f} | {method} | {sched} | {r.pass_rate:.3f} | {r.fail_rate:.3f} | "
                    f"{r.undecided_rate:.3f} | {r.mean_items:.0f} | {np.median(r.n_used):.0f} | "
                    f"{rel0:.2f} (n={n0}) | {reld} |"
                )
        plug = {m: sq.sequential_items(sd, MARGIN, ALPHA, drop, method=m) for m in methods}
        print(
            f"| {name}: plug-in sequential_items (every item) | | " + ", ".join(f"{m}={v}" for m, v in plug.items()) + " | | | | | | | | |"
        )
    print("\nThe fixed-n(δ=0) design in the same scenarios (same draws, its first n items):\n")
    print("| scenario | fixed n | P(pass) | P(fail) |")
    print("|---|---|---|---|")
    for name, n0, pp, pf in fixed_rows:
        print(f"| {name} | {n0} | {pp:.3f} | {pf:.3f} |")
    print("\nBinary scenarios (broken, lossless, small loss), mean items / fixed-n(δ=0), averaged:\n")
    print("| method | rounds | average ratio |")
    print("|---|---|---|")
    for (method, sched), rs in ratios.items():
        print(f"| {method} | {sched} | {np.mean(rs):.2f} |")

    print("\nError rates at the margin (true drop = margin), looks x2 from 50 to 6,400, first decision stops:\n")
    print("| law | method | false pass | false fail | naive peeking, fixed-n one-sided 95% bound |")
    print("|---|---|---|---|---|")
    looks = sq.geometric_looks(50, 6400)
    for law, gen, discord in [("binary, 15% flips", binary, 0.15), ("MC2-like", mc2, None)]:
        d = draw(gen, np.random.default_rng(7), args.runs, 6400, MARGIN, discord)
        naive = naive_peek(d, looks, MARGIN)
        for method in methods:
            r = sq.simulate_gate(d, MARGIN, ALPHA, -1.0, 1.0, looks, method)
            print(f"| {law} | {method} | {r.pass_rate:.4f} | {r.fail_rate:.4f} | {naive:.3f} |")
    d = binary(np.random.default_rng(8), args.runs, 800, MARGIN + 0.02, 0.15)
    straddle = float((d.mean(1) - 1.96 * d.std(1, ddof=1) / math.sqrt(800) <= MARGIN).mean())
    seq = sq.simulate_gate(d, MARGIN, ALPHA, -1.0, 1.0, sq.geometric_looks(50, 800)).pass_rate
    print(f"\nTrue drop 5 pts, margin 3, 800 items: old straddle rule passes {straddle:.3f}, the sequential gate (betting) {seq:.4f}.")
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
