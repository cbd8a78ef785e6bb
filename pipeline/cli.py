"""Command line: quantpipe run | build | table | gate | doctor | validate | stages | models fetch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import QuantpipeError


def _run(a) -> int:
    from .recipe import load_recipe
    from .runner import Runner

    runners = []
    for path in a.recipe:
        recipe = load_recipe(path)
        if a.offline:
            recipe.offline = True
        if a.engine:
            recipe.eval.engine = a.engine
        runners.append(Runner(recipe, Path(a.artifacts), a.allow_code_execution,
                              Path(a.data_dir) if a.data_dir else None, a.variant))
    if a.variant and len(runners) > 1:
        raise QuantpipeError("--variant names variants of one recipe; pass a single recipe with it")
    if len({r.recipe.name for r in runners}) < len(runners):
        raise QuantpipeError("two recipes share a name, so they would share an artifact folder")
    if a.executor == "ray":
        from .distributed import run_on_ray

        reports = run_on_ray(runners, a.ray_address, wait=a.wait)
    else:
        if a.ray_address:
            raise QuantpipeError("--ray-address needs --executor ray")
        reports = [r.run(wait=a.wait) for r in runners]
    for report in reports:
        print((report / "degradation.md").read_text())
        print(f"report: {report}/degradation.{{md,csv,json}}", file=sys.stderr)
    return 0


def _build(a) -> int:
    """Stage outputs only (e.g. to evaluate elsewhere, or by hand)."""
    from . import artifacts as store
    from .recipe import load_recipe
    from .runner import Runner

    recipe = load_recipe(a.recipe)
    if a.offline:
        recipe.offline = True
    runner = Runner(recipe, Path(a.artifacts), variants=a.variant)
    with store.run_lock(runner.root, wait=a.wait):
        store.clean_stale_tmp(runner.root)
        runner.prepare_model()
        for variant in runner.variants:
            art = runner.build(variant)
            print(f"{variant}\t{art.format}\t{art.path}")
    return 0


def _table(a) -> int:
    from .report import write_report

    root = Path(a.run_dir)
    if not (root / "base").is_dir():
        raise QuantpipeError(f"{root} holds no run (no base/ folder); pass artifacts/<recipe-name>")
    out = write_report(root, root.name)
    print((out / f"degradation.{a.format}").read_text())
    return 0


def _gate(a) -> int:
    from .gate import GateConfig, evaluate_gate, junit_xml, load_table, summary

    table, cfg = load_table(Path(a.target))
    merged = (cfg.model_dump() if cfg else {}) | {k: v for k, v in {
        "max_avg_drop": a.max_avg_drop, "min_items": a.min_items, "min_recovery": a.min_recovery, "max_kl": a.max_kl,
        "require_significant": a.require_significant or None, "variants": a.variant}.items() if v is not None}
    for item in a.max_drop or []:
        bench, _, value = item.partition("=")
        if not value:
            raise QuantpipeError(f"--max-drop expects BENCH=POINTS (e.g. GSM8K=2 or default=3), got '{item}'")
        try:
            merged.setdefault("max_drop", {})[bench] = float(value)
        except ValueError:
            raise QuantpipeError(f"--max-drop {item}: '{value}' is not a number") from None
    cfg = GateConfig.model_validate(merged)
    if not cfg.max_drop and cfg.max_avg_drop is None and cfg.min_recovery is None and cfg.max_kl is None:
        raise QuantpipeError("no thresholds: set gate: in the recipe or pass --max-drop / --max-avg-drop / --min-recovery / --max-kl")
    verdict = evaluate_gate(table, cfg)
    print(summary(verdict))
    if a.json:
        Path(a.json).write_text(json.dumps(verdict.to_dict(), indent=1))
    if a.junit:
        Path(a.junit).write_text(junit_xml(verdict))
    return verdict.exit_code


def _doctor(a) -> int:
    from .doctor import check

    findings = check(a.recipe, Path(a.artifacts), a.allow_code_execution)
    for f in findings:
        print(f"{'ok  ' if f.ok else 'FAIL'} {f.what}" + (f"\n     fix: {f.fix}" if f.fix else ""))
    bad = sum(not f.ok for f in findings)
    print(f"{bad} problem(s)" if bad else "ready")
    return 1 if bad else 0


def _validate(a) -> int:
    from .evaluation import resolve_tasks
    from .recipe import load_recipe

    recipe = load_recipe(a.recipe)
    resolve_tasks(recipe)
    print(f"{a.recipe}: ok ({len(recipe.variants)} variants: {', '.join(recipe.variants)})")
    return 0


def _stages(a) -> int:
    from .registry import available_stages

    for name, ep in sorted(available_stages().items()):
        print(f"{name:12s} {ep.value}  ({ep.dist.name if ep.dist else '?'})")
    return 0


def _fetch(a) -> int:
    from .models import fetch_builtin

    print(fetch_builtin(a.name, force=a.force))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantpipe", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="quantize every variant, evaluate, write the table")
    r.add_argument("recipe", nargs="+", help="one recipe, or several (one per model) run as one batch")
    r.add_argument("--artifacts", default="artifacts", help="artifact store root (default: artifacts)")
    r.add_argument("--allow-code-execution", action="store_true",
                   help="opt in to running model-written code (HumanEval), sandboxed")
    r.add_argument("--data-dir", help="local dataset copies (overrides the recipe's eval.data_dir)")
    r.add_argument("--offline", action="store_true", help="never contact a model or dataset hub")
    r.add_argument("--variant", action="append", help="run only this variant (repeatable)")
    r.add_argument("--wait", action="store_true", help="if another run holds this recipe's folder, wait for it")
    r.add_argument("--engine", choices=["default", "vllm"],
                   help="evaluation engine (overrides the recipe's eval.engine); vllm needs a CUDA GPU")
    r.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: this process (default); ray: one task per variant build and per row x benchmark")
    r.add_argument("--ray-address", help="Ray cluster to join (e.g. 10.0.0.5:6379 or auto); default: start one here")
    r.set_defaults(fn=_run)

    b = sub.add_parser("build", help="build the variants' artifacts only; print variant, format, path")
    b.add_argument("recipe")
    b.add_argument("--artifacts", default="artifacts")
    b.add_argument("--offline", action="store_true")
    b.add_argument("--variant", action="append")
    b.add_argument("--wait", action="store_true")
    b.set_defaults(fn=_build)

    t = sub.add_parser("table", help="rebuild and print the table from stored results")
    t.add_argument("run_dir")
    t.add_argument("--format", choices=["md", "csv", "json"], default="md")
    t.set_defaults(fn=_table)

    g = sub.add_parser("gate", help="deploy decision from a run's table: exit 0 pass, 1 fail, 2 error/undecided")
    g.add_argument("target", help="run folder (artifacts/<recipe>) or recipe file")
    g.add_argument("--max-drop", action="append", metavar="BENCH=POINTS", help="max drop in points (BENCH or default)")
    g.add_argument("--max-avg-drop", type=float, metavar="PCT", help="max average relative drop, %%")
    g.add_argument("--min-recovery", type=float, metavar="PCT", help="min variant/base score per benchmark, %%")
    g.add_argument("--max-kl", type=float, metavar="NATS", help="max mean next-token KL to the base")
    g.add_argument("--require-significant", action="store_true", help="fail only when the 95%% CI of the drop exceeds the threshold")
    g.add_argument("--min-items", type=int, help="below this many items an undecidable check is reported as such")
    g.add_argument("--variant", action="append", help="check only this variant (repeatable)")
    g.add_argument("--json", help="write the verdict as JSON here")
    g.add_argument("--junit", help="write the verdict as JUnit XML here")
    g.set_defaults(fn=_gate)

    d = sub.add_parser("doctor", help="check packages, accelerator, disk, data and opt-ins before a long run")
    d.add_argument("recipe", nargs="?")
    d.add_argument("--artifacts", default="artifacts")
    d.add_argument("--allow-code-execution", action="store_true")
    d.set_defaults(fn=_doctor)

    v = sub.add_parser("validate", help="check a recipe without running anything")
    v.add_argument("recipe")
    v.set_defaults(fn=_validate)

    s = sub.add_parser("stages", help="list registered stages (entry points 'quantpipe.stages')")
    s.set_defaults(fn=_stages)

    m = sub.add_parser("models", help="built-in models")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    f = msub.add_parser("fetch", help="build an HF checkpoint of a built-in model")
    f.add_argument("name")
    f.add_argument("--force", action="store_true")
    f.set_defaults(fn=_fetch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except QuantpipeError as e:
        print(f"quantpipe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
