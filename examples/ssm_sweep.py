#!/usr/bin/env python
"""Run STL / Baseline / SSM (and DPM ablations) over several seeds and tabulate mean ± std.

    python examples/ssm_sweep.py --out runs/sweep --seeds 0 1 2 -- --synthetic-size 0.5 --epochs 8
    python examples/ssm_sweep.py --out runs/sweep --configs ssm baseline --seeds 0   # a subset
    python examples/ssm_sweep.py --out runs/sweep --table                            # table only
    python examples/ssm_sweep.py --out runs/sweep --setting unseen --configs baseline tsp ssm --seeds 0

Arguments after ``--`` go to every ``ssm_reference.py`` run; ``--setting`` adds a transfer
setting's flags to every run (``SETTINGS``; docs/reference.md, "Transfer settings"). Runs execute in this process one after
the other, and the (synthetic) datasets are built once per task set and reused, so a sweep costs
little more than its training. Results are appended to ``<out>/results.jsonl`` (a run already
there is skipped), so several sweeps with disjoint ``--configs`` can run side by side and
``--table`` merges them into ``<out>/table.md``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from facelayers.models import cli



def _load_reference() -> Any:
    """``examples/ssm_reference.py`` as a module, loaded from its path beside this script."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ssm_reference.py")
    spec = importlib.util.spec_from_file_location("ssm_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


R = _load_reference()

#: name -> (ssm_reference flags, table label)
CONFIGS: dict[str, tuple[list[str], str]] = {
    "stl-exp": (["--mode", "stl", "--task", "exp"], "STL (expression only)"),
    "stl-au": (["--mode", "stl", "--task", "au"], "STL (AU only)"),
    "baseline": (["--mode", "baseline"], "Baseline (MoE + linear heads)"),
    "tsp": (["--no-dpm"], "+ TSP (no DPM)"),
    "ssm": ([], "SSM (TSP + DPM)"),
    "dpm-random": (["--dpm-init", "random"], "SSM, DPM random init"),
    "dpm-nodual": (["--no-dual"], "SSM, DPM without dual (B = Aᵀ)"),
    "dpm-frozen": (["--freeze-dpm"], "SSM, DPM (prior, frozen)"),
    "dpm-linear": (["--mapping", "linear"], "SSM, linear mapping"),
    "dpm-mlp": (["--mapping", "mlp"], "SSM, MLP mapping"),
}
DEFAULT_CONFIGS = ["stl-exp", "stl-au", "baseline", "tsp", "ssm", "dpm-random", "dpm-frozen"]

#: Transfer settings (issue 20): name -> (ssm_reference flags added to every run, table label).
SETTINGS: dict[str, tuple[list[str], str]] = {
    "default": ([], "default"),
    "few-shot": (["--exp-shots", "10"], "few-shot expressions (10 clips per class)"),
    "unseen": (["--exp-dataset", "mafw", "--unseen-classes", "contempt,anxiety,helplessness,disappointment"],
               "unseen classes (MAFW's 4 compound classes never trained)"),
    "frozen-visual": (["--freeze-visual"], "vision weights frozen"),
    "lr-visual-1e-6": (["--lr-visual", "1e-6"], "vision weights at the paper's lr 1e-6"),
}


#: options of ``ssm_reference.py`` the sweep sets itself for every run (not allowed after ``--``)
SWEEP_OWNED = ("--seed", "--out")
_METRICS = ("uar", "war", "au_f1", "au_auc")


def _real_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def read_results(results_path: str) -> list[dict[str, Any]]:
    """The rows of ``results.jsonl``, each checked: a JSON object with a string ``config``, an
    integer ``seed``, ``uar``, ``war``, ``au_f1``, ``au_auc`` numbers or null (and, if present, a
    string ``setting`` and numbers or null for the other metrics).

    Raises:
        UsageError: a line that is not such a row, naming ``file:line``.
    """
    rows = []
    with open(results_path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{results_path}:{i}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise cli.UsageError(f"{where}: not JSON (expected one JSON row per line, got {line.strip()[:40]!r}: "
                                     f"{err.msg})") from None
            if not isinstance(row, dict):
                raise cli.UsageError(f"{where}: not a row (expected a JSON object, got {type(row).__name__})")
            missing = [k for k in ("config", "seed", *_METRICS) if k not in row]
            if missing:
                raise cli.UsageError(f"{where}: incomplete row (expected the keys config, seed, {', '.join(_METRICS)}, "
                                     f"got no {', '.join(missing)})")
            for k in ("config", "setting"):
                if k in row and not isinstance(row[k], str):
                    raise cli.UsageError(f"{where}: {k} (expected a string, got {row[k]!r})")
            if isinstance(row["seed"], bool) or not isinstance(row["seed"], int):
                raise cli.UsageError(f"{where}: seed (expected an integer, got {row['seed']!r})")
            for k in (*_METRICS, "unseen_uar", "unseen_accuracy", "seen_uar"):
                if not _real_or_none(row.get(k)):
                    raise cli.UsageError(f"{where}: {k} (expected a number or null, got {row[k]!r})")
            rows.append(row)
    return rows


def _done(results_path: str) -> set[tuple[str, str, int]]:
    if not os.path.isfile(results_path):
        return set()
    return {(r.get("setting", "default"), r["config"], r["seed"]) for r in read_results(results_path)}


def _run_dir(out: str, setting: str, name: str, seed: int) -> str:
    sub = f"{name}-seed{seed}"
    return os.path.join(out, sub) if setting == "default" else os.path.join(out, setting, sub)


def run_sweep(out: str, configs: Sequence[str], seeds: Sequence[int], extra: Sequence[str],
              setting: str = "default") -> None:
    os.makedirs(out, exist_ok=True)
    results_path = os.path.join(out, "results.jsonl")
    done = _done(results_path)
    R.enable_dataset_cache()
    setting_flags = SETTINGS[setting][0]
    for name in configs:
        flags, _ = CONFIGS[name]
        for seed in seeds:
            if (setting, name, seed) in done:
                print(f"[sweep] skip {setting}/{name} seed {seed} (already in {results_path})", file=sys.stderr)
                continue
            argv = [*flags, *setting_flags, "--seed", str(seed), "--out", _run_dir(out, setting, name, seed),
                    "--no-progress", "--no-plots", *extra]
            print(f"[sweep] {name} seed {seed}: {' '.join(argv)}", file=sys.stderr)
            res = R.run(R.validate_args(R.build_parser().parse_args(argv)))
            test = res["test"]
            row = {"config": name, "seed": seed, "argv": argv, "seconds": res["seconds"],
                   "uar": test.get("exp", {}).get("uar"), "war": test.get("exp", {}).get("war"),
                   "au_f1": test.get("au", {}).get("f1_mean"), "au_auc": test.get("au", {}).get("auc_mean"),
                   "best_epoch": res["best_epoch"]}
            if setting != "default":
                row["setting"] = setting
            unseen = test.get("exp_unseen")
            if unseen is not None:
                row.update(unseen_uar=unseen["uar"], unseen_accuracy=unseen["accuracy"], seen_uar=unseen["seen_uar"],
                           among_unseen_uar=unseen.get("among_unseen_uar"), ausuc=unseen.get("ausuc"))
            with open(results_path, "a") as f:
                f.write(json.dumps(row) + "\n")


def _mean_std(values: list[float]) -> str:
    vals = [100 * v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "–"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.1f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{m:.1f} ± {sd:.1f}"


def make_table(out: str) -> str:
    results_path = os.path.join(out, "results.jsonl")
    rows = read_results(results_path)
    by: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by.setdefault((r.get("setting", "default"), r["config"]), []).append(r)
    transfer = any(s != "default" for s, _ in by) or any("unseen_uar" in r for r in rows)
    if not transfer:  # the default sweep's table, as before the transfer settings
        lines = ["| setting | seeds | expression UAR | expression WAR | AU F1@0.5 | AU AUC |",
                 "|---|---|---|---|---|---|"]
    else:
        lines = ["| transfer setting | model | seeds | expression UAR | expression WAR | unseen-class UAR | "
                 "unseen-class acc. | seen-class UAR | unseen UAR among unseen | AUSUC | AU F1@0.5 | AU AUC |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        for name in CONFIGS:
            if (setting, name) not in by:
                continue
            rs = by[(setting, name)]
            cells = [_mean_std([r["uar"] for r in rs]), _mean_std([r["war"] for r in rs])]
            if transfer:
                cells += [_mean_std([r.get(k) for r in rs])
                          for k in ("unseen_uar", "unseen_accuracy", "seen_uar", "among_unseen_uar", "ausuc")]
            cells += [_mean_std([r["au_f1"] for r in rs]), _mean_std([r["au_auc"] for r in rs])]
            head = [SETTINGS[setting][1], CONFIGS[name][1]] if transfer else [CONFIGS[name][1]]
            lines.append("| " + " | ".join([*head, str(len(rs)), *cells]) + " |")
    table = "\n".join(lines)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    return table


def check_sweep_args(args: Any, extra: Sequence[str]) -> None:
    """Refuse what would run nothing, run a setting twice or override the sweep's own options.

    Raises:
        UsageError: an empty or repeated ``--configs`` / ``--seeds``; ``--configs`` / ``--seeds`` /
            run options with ``--table`` (nothing is run); ``--seed`` / ``--out`` after ``--``.
    """
    for flag, values in (("--configs", args.configs), ("--seeds", args.seeds)):
        if values is None:
            continue
        if args.table:
            raise cli.UsageError(f"{flag}: has no effect with --table (expected no {flag}, got {flag} "
                                 f"{' '.join(map(str, values))})")
        if not values:
            raise cli.UsageError(f"{flag}: nothing to run (expected at least one value, got none)")
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            raise cli.UsageError(f"{flag}: a run would count twice in mean ± std (expected distinct values, got "
                                 f"{', '.join(twice)} more than once)")
    if args.table and extra:
        raise cli.UsageError(f"--: run options have no effect with --table (expected none, got {' '.join(extra)})")
    for a in extra:
        if a.split("=", 1)[0] in SWEEP_OWNED:
            raise cli.UsageError(f"{a.split('=', 1)[0]}: set by the sweep for every run (expected it out of the "
                                 f"options after --, got {a})")


def _main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = cli.ScriptArgumentParser(prog="ssm_sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=cli.output_folder, default=os.path.join("runs", "sweep"))
    p.add_argument("--configs", nargs="*", default=None, choices=sorted(CONFIGS),
                   help=f"settings to run (default: {' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--seeds", nargs="*", type=cli.nonnegative_int, default=None, help="seeds (default: 0 1 2)")
    p.add_argument("--setting", choices=list(SETTINGS), default="default",
                   help="transfer setting whose flags every run gets (docs/reference.md, Transfer settings)")
    p.add_argument("--table", action="store_true", help="only print / write the table from results.jsonl")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    args = p.parse_args(argv)
    check_sweep_args(args, extra)
    args.configs = list(DEFAULT_CONFIGS) if args.configs is None else args.configs
    args.seeds = [0, 1, 2] if args.seeds is None else args.seeds
    if not args.table:
        for name in args.configs:  # every run's arguments are checked before the first run starts
            flags, _ = CONFIGS[name]
            R.validate_args(R.build_parser().parse_args([*flags, *SETTINGS[args.setting][0], "--out",
                                                         os.path.join(args.out, "check"), *extra]))
        run_sweep(args.out, args.configs, args.seeds, extra, args.setting)
    elif not os.path.isfile(os.path.join(args.out, "results.jsonl")):
        raise cli.UsageError(f"--table: no results yet (expected {os.path.join(args.out, 'results.jsonl')}, got no such file)")
    print(make_table(args.out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``error: ...`` + exit code 2 for every user error (``--debug``: traceback)."""
    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
