"""Command line: quantpipe run | build | table | gate | plan | doctor | validate | stages | backends | models fetch.

Results go to standard output (see log.py); progress, one line per plan step, to standard error.
Bad input: one line and exit 2. Ctrl-C / SIGTERM: one line, child processes stopped, the lock
released, and the next run resumes from what was stored.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from . import log as output
from .errors import QuantpipeError
from .log import capture_output, messages, results, setup

log = logging.getLogger("quantpipe")


def _jobs(a):
    from .job import Job
    from .recipe import load_recipe

    jobs = []
    for path in a.recipe if isinstance(a.recipe, list) else [a.recipe]:
        recipe = load_recipe(path)
        if a.offline:
            recipe.offline = True
        if getattr(a, "engine", None):
            recipe.eval.engine = a.engine
        if getattr(a, "until_decided", False):
            if recipe.gate is None:
                raise QuantpipeError(f"--until-decided needs a `gate:` section with margins in {path}")
            recipe.gate.until_decided = True
        jobs.append(
            Job(
                recipe,
                Path(a.artifacts),
                getattr(a, "allow_code_execution", False),
                Path(a.data_dir) if getattr(a, "data_dir", None) else None,
                a.variant,
            )
        )
    if a.variant and len(jobs) > 1:
        raise QuantpipeError("--variant names variants of one recipe; pass a single recipe with it")
    if len({j.recipe.name for j in jobs}) < len(jobs):
        raise QuantpipeError("two recipes share a name, so they would share an artifact folder")
    return jobs


def _run(a) -> int:
    from .runner import run_local

    jobs = _jobs(a)
    if a.executor == "ray":
        from .distributed import run_on_ray

        reports = run_on_ray(jobs, a.ray_address, wait=a.wait)
    else:
        if a.ray_address:
            raise QuantpipeError("--ray-address needs --executor ray")
        reports = [run_local(j, wait=a.wait) for j in jobs]
    for report in reports:
        results().write((report / "degradation.md").read_text() + "\n")
        log.info("report: %s/degradation.{md,csv,json}, report.html", report)
    return 0


def _build(a) -> int:
    """Stage outputs only (e.g. to evaluate elsewhere, or by hand): the plan cut after the builds."""
    from .runner import run_local

    (job,) = _jobs(a)
    run_local(job, wait=a.wait, builds_only=True)
    failed = []
    for row in job.variants:
        try:
            art = job.artifact(row)
        except QuantpipeError as e:
            failed.append(row)
            log.error("%s: %s", row, e)
            continue
        line = {"variant": row, "format": art.format, "path": str(art.path), "bits": art.bits, "key": art.key}
        results().write((json.dumps(line) if a.json else f"{row}\t{art.format}\t{art.path}") + "\n")
    return 1 if failed else 0


def _table(a) -> int:
    from .report import write_report
    from .store import run_lock

    root = Path(a.run_dir)
    if not (root / "plan.json").is_file():
        raise QuantpipeError(f"{root} holds no run (no plan.json); pass artifacts/<recipe-name>")
    with run_lock(root, wait=a.wait):  # never a table of a run in progress
        out = write_report(root)
    name = {"md": "degradation.md", "csv": "degradation.csv", "json": "degradation.json"}[a.format]
    if a.layout == "section7" and a.format == "md":
        name = "degradation-section7.md"
    results().write((out / name).read_text())
    return 0


def _gate(a) -> int:
    from .gate import evaluate_gate, junit_xml, resolve_config, stored_config, summary
    from .store import dumps, run_lock

    target, artifacts = Path(a.target), Path(a.artifacts)
    recipe = None
    if target.is_file():
        from .recipe import load_recipe

        recipe = load_recipe(target)
        root = artifacts / recipe.name
    else:
        root = target
    if not (root / "plan.json").is_file():
        raise QuantpipeError(f"{root} holds no run (no plan.json); run `quantpipe run` first")
    with run_lock(root, wait=a.wait):  # never a verdict on a run in progress
        table = _current_table(root, recipe)
        flags = {
            "max_avg_drop": a.max_avg_drop,
            "min_recovery": a.min_recovery,
            "max_kl": a.max_kl,
            "alpha": a.alpha,
            "point_estimate": a.point_estimate or None,
            "variants": a.variant,
        }
        cfg = resolve_config(recipe.gate if recipe else stored_config(root), flags, a.max_drop)
    if not cfg.has_thresholds():
        raise QuantpipeError("no thresholds: set gate: in the recipe or pass --max-drop / --max-avg-drop / --min-recovery / --max-kl")
    verdict = evaluate_gate(table, cfg)
    results().write(summary(verdict) + "\n")
    for dest, text in ((a.json, lambda: dumps(verdict.to_dict(), indent=1)), (a.junit, lambda: junit_xml(verdict))):
        if dest:
            try:
                Path(dest).write_text(text())
            except OSError as e:
                raise QuantpipeError(f"cannot write {dest}: {e.strerror}") from e
    return verdict.exit_code


def _current_table(root: Path, recipe=None):
    """The run's report table, refused unless it was built from the run's current plan (and, given a
    recipe, from that recipe's plan as it stands now: another model, data or variant definition
    changes step keys)."""
    import tempfile

    from .plan import step_keys
    from .store import read_json
    from .table import Table

    path = root / "report" / "degradation.json"
    data = read_json(path)
    if not path.is_file():
        raise QuantpipeError(f"no table at {path}; run `quantpipe run` (or `quantpipe table {root}`) first")
    if not isinstance(data, dict):
        raise QuantpipeError(f"{path} is not valid JSON (an interrupted write?); run `quantpipe table {root}`")
    table = Table.from_dict(data)
    if table.plan_keys != step_keys((read_json(root / "plan.json") or {}).get("steps", [])):
        raise QuantpipeError(
            f"the report in {root} was built from another plan than the run's current one (plan.json changed since: "
            f"an interrupted run of a changed recipe?); finish the run (`quantpipe run`) or rebuild it (`quantpipe table {root}`)"
        )
    if recipe is not None:
        from .job import Job

        with tempfile.TemporaryDirectory(prefix="quantpipe-gate-") as work:
            job = Job(recipe, root.parent, allow_code_execution=True, workdir=Path(work))
            job.prepare()
            current = step_keys([s.to_dict(job.root) for s in job.plan().steps])
        stale = sorted(i for i, k in table.plan_keys.items() if current.get(i) != k)
        if stale:
            raise QuantpipeError(
                f"the report in {root} is not for {recipe.source or recipe.name} as it stands now ({len(stale)} step(s) "
                f"changed, e.g. '{stale[0]}': the recipe, its model or its data changed); run it again first"
            )
    return table


def _plan(a) -> int:
    from .gate import resolve_config
    from .items_needed import plan_report
    from .runner import run_local

    (job,) = _jobs(a)
    cfg = resolve_config(job.recipe.gate, max_drop=a.max_drop)
    if not cfg.max_drop:
        raise QuantpipeError("no margins: set gate.max_drop in the recipe or pass --max-drop BENCH=POINTS")
    if a.pilot:  # the first round of a random-order sequential run
        job.recipe.eval.order = "random"
        job.recipe.gate = cfg.model_copy(update={"until_decided": True})
        run_local(job, wait=a.wait, max_rounds=1)
    results().write(plan_report(job.root, cfg, a.power))
    return 0


def _doctor(a) -> int:
    from .doctor import check

    findings = check(a.recipe, Path(a.artifacts), a.allow_code_execution)
    for f in findings:
        results().write(f"{'ok  ' if f.ok else 'FAIL'} {f.what}" + (f"\n     fix: {f.fix}" if f.fix else "") + "\n")
    bad = sum(not f.ok for f in findings)
    results().write((f"{bad} problem(s)" if bad else "ready") + "\n")
    return 1 if bad else 0


def _validate(a) -> int:
    """Everything `run` checks before any work: the recipe, the model (config, weights, group sizes),
    the evaluation backends, the suite and tasks, the data directory and its files."""
    from .job import Job
    from .recipe import load_recipe

    recipe = load_recipe(a.recipe)
    Job(recipe, Path(a.artifacts), allow_code_execution=True, workdir=Path(a.artifacts) / ".validate").prepare()
    results().write(f"{a.recipe}: ok ({len(recipe.variants)} variants: {', '.join(recipe.variants)})\n")
    return 0


def _stages(a) -> int:
    from .stages.registry import STAGES

    for name, e in STAGES.entries().items():
        results().write(f"{name:12s} {e.value}  ({e.distribution} {e.version})\n")
    return 0


def _backends(a) -> int:
    from .backends.base import BACKENDS

    for name, e in BACKENDS.entries().items():
        try:  # one broken plug-in is one line here, not the end of the listing
            cls = BACKENDS.load(name)
            what = f"engine {cls.engine:8s} formats {', '.join(cls.formats):28s}"
        except QuantpipeError as err:
            what = f"UNUSABLE: {err}"
        results().write(f"{name:12s} {what} {e.value}  ({e.distribution} {e.version})\n")
    return 0


def _fetch(a) -> int:
    from .models import fetch_builtin

    results().write(f"{fetch_builtin(a.name, force=a.force)}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="everything, third-party output included")
    common.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p = argparse.ArgumentParser(prog="quantpipe", description=__doc__.split("\n")[0], parents=[common])
    sub = p.add_subparsers(dest="cmd", required=True)

    def cmd(name, fn, help):
        s = sub.add_parser(name, help=help, parents=[common])
        s.set_defaults(fn=fn)
        return s

    def recipe_args(s, many=False):
        s.add_argument("recipe", nargs="+" if many else None, help="recipe file(s)" if many else "recipe file")
        s.add_argument("--artifacts", default="artifacts", help="artifact store root (default: artifacts)")
        s.add_argument("--offline", action="store_true", help="never contact a model or dataset hub")
        s.add_argument("--variant", action="append", help="only this variant (repeatable)")
        s.add_argument("--wait", action="store_true", help="if another run holds this recipe's folder, wait for it")

    r = cmd("run", _run, "quantize every variant, evaluate, write the table")
    recipe_args(r, many=True)
    r.add_argument("--allow-code-execution", action="store_true", help="opt in to running model-written code (HumanEval), sandboxed")
    r.add_argument("--data-dir", help="local dataset copies (overrides the recipe's eval.data_dir)")
    r.add_argument(
        "--engine",
        help="evaluation engine (overrides the recipe's eval.engine); vllm needs a CUDA GPU",
    )
    r.add_argument(
        "--executor", choices=["local", "ray"], default="local", help="local: this process (default); ray: one task per plan step"
    )
    r.add_argument("--ray-address", help="Ray cluster to join (e.g. 10.0.0.5:6379 or auto); default: start one here")
    r.add_argument(
        "--until-decided",
        action="store_true",
        help="evaluate in doubling rounds (eval.order: random) and stop each check once the gate decides it",
    )

    b = cmd("build", _build, "build the variants' artifacts only; print variant, format, path")
    recipe_args(b)
    b.add_argument("--json", action="store_true", help="one JSON object per variant (for programs)")

    t = cmd("table", _table, "rebuild and print the table from stored results")
    t.add_argument("run_dir")
    t.add_argument("--format", choices=["md", "csv", "json"], default="md")
    t.add_argument(
        "--layout",
        choices=["methods", "section7"],
        default="methods",
        help="section7: benchmarks as rows, methods as columns, Average Drop last",
    )
    t.add_argument("--wait", action="store_true", help="wait for a run in progress instead of refusing")

    g = cmd("gate", _gate, "deploy decision from a run's table: exit 0 pass, 1 fail, 2 error/undecided")
    g.add_argument("target", help="run folder (artifacts/<recipe>) or recipe file")
    g.add_argument("--artifacts", default="artifacts", help="where a recipe's run folder is (default: artifacts)")
    g.add_argument("--max-drop", action="append", metavar="BENCH=POINTS", help="margin in points (BENCH or default)")
    g.add_argument("--max-avg-drop", type=float, metavar="PCT", help="max average relative drop, %%")
    g.add_argument("--min-recovery", type=float, metavar="PCT", help="min variant/base score per benchmark, %%")
    g.add_argument("--max-kl", type=float, metavar="NATS", help="max mean next-token KL to the base")
    g.add_argument("--alpha", type=float, help="family-wise error rate per variant (default 0.05)")
    g.add_argument("--point-estimate", action="store_true", help="decide on point estimates (not a statistical test)")
    g.add_argument("--variant", action="append", help="check only this variant (repeatable)")
    g.add_argument("--json", help="write the verdict as JSON here")
    g.add_argument("--junit", help="write the verdict as JUnit XML here")
    g.add_argument("--wait", action="store_true", help="wait for a run in progress instead of refusing")

    pl = cmd("plan", _plan, "items (and time) each check needs to decide, from stored results or a pilot round")
    recipe_args(pl)
    pl.add_argument("--max-drop", action="append", metavar="BENCH=POINTS", help="margin in points (BENCH or default)")
    pl.add_argument("--power", type=float, default=0.9, help="power of the fixed-n design it is compared with (default 0.9)")
    pl.add_argument("--pilot", action="store_true", help="first evaluate one round of a random-order run (seeded items)")
    pl.add_argument("--allow-code-execution", action="store_true", help="needed for a pilot that includes HumanEval")

    d = cmd("doctor", _doctor, "check packages, accelerator, disk, data and opt-ins before a long run")
    d.add_argument("recipe", nargs="?")
    d.add_argument("--artifacts", default="artifacts")
    d.add_argument("--allow-code-execution", action="store_true")

    v = cmd("validate", _validate, "check a recipe, its model and its data without running anything")
    v.add_argument("recipe")
    v.add_argument("--artifacts", default="artifacts", help="where task configs are staged (default: artifacts)")

    cmd("stages", _stages, "list registered stages (entry points 'quantpipe.stages')")
    cmd("backends", _backends, "list registered evaluation backends (entry points 'quantpipe.backends')")

    m = sub.add_parser("models", help="built-in models", parents=[common])
    msub = m.add_subparsers(dest="models_cmd", required=True)
    f = msub.add_parser("fetch", help="build an HF checkpoint of a built-in model", parents=[common])
    f.add_argument("name")
    f.add_argument("--force", action="store_true")
    f.set_defaults(fn=_fetch)
    return p


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so context managers (locks, child processes) unwind."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbosity = 1 if args.verbose else -1 if args.quiet else 0
    setup(verbosity)
    capture_output(verbosity)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.fn(args)
    except QuantpipeError as e:
        print(f"quantpipe: error: {e}", file=messages())
        return 2
    except KeyboardInterrupt:
        print("quantpipe: interrupted; finished steps are stored and the next run resumes from them", file=messages())
        return 130
    except Terminated:
        print("quantpipe: terminated; finished steps are stored and the next run resumes from them", file=messages())
        return 143
    except Exception as e:  # noqa: BLE001 - a bug: one line here, the traceback in the log
        import traceback

        traceback.print_exc()
        where = f" (traceback in {output.log_path})" if output.log_path else ""
        print(f"quantpipe: internal error: {type(e).__name__}: {e}{where}", file=messages())
        return 1


if __name__ == "__main__":
    sys.exit(main())
