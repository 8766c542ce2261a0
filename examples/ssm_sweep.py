#!/usr/bin/env python
"""Run STL / Baseline / SSM (and DPM ablations) over several seeds and tabulate mean ± std.

    python examples/ssm_sweep.py --out runs/sweep --seeds 0 1 2 -- --synthetic-size 0.5 --epochs 8
    python examples/ssm_sweep.py --out runs/sweep --configs ssm baseline --seeds 0   # a subset
    python examples/ssm_sweep.py --out runs/sweep --table                            # table only

Arguments after ``--`` go to every ``ssm_reference.py`` run. Runs execute in this process one after
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


def _done(results_path: str) -> set[tuple[str, int]]:
    if not os.path.isfile(results_path):
        return set()
    with open(results_path) as f:
        return {(r["config"], r["seed"]) for r in map(json.loads, f) if r}


def run_sweep(out: str, configs: Sequence[str], seeds: Sequence[int], extra: Sequence[str]) -> None:
    os.makedirs(out, exist_ok=True)
    results_path = os.path.join(out, "results.jsonl")
    done = _done(results_path)
    R.enable_dataset_cache()
    for name in configs:
        flags, _ = CONFIGS[name]
        for seed in seeds:
            if (name, seed) in done:
                print(f"[sweep] skip {name} seed {seed} (already in {results_path})", file=sys.stderr)
                continue
            argv = [*flags, "--seed", str(seed), "--out", os.path.join(out, f"{name}-seed{seed}"), "--no-progress",
                    "--no-plots", *extra]
            print(f"[sweep] {name} seed {seed}: {' '.join(argv)}", file=sys.stderr)
            res = R.run(R.validate_args(R.build_parser().parse_args(argv)))
            test = res["test"]
            row = {"config": name, "seed": seed, "argv": argv, "seconds": res["seconds"],
                   "uar": test.get("exp", {}).get("uar"), "war": test.get("exp", {}).get("war"),
                   "au_f1": test.get("au", {}).get("f1_mean"), "au_auc": test.get("au", {}).get("auc_mean"),
                   "best_epoch": res["best_epoch"]}
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
    with open(results_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)
    lines = ["| setting | seeds | expression UAR | expression WAR | AU F1@0.5 | AU AUC |",
             "|---|---|---|---|---|---|"]
    for name in CONFIGS:
        if name not in by:
            continue
        rs = by[name]
        lines.append(f"| {CONFIGS[name][1]} | {len(rs)} | {_mean_std([r['uar'] for r in rs])} | "
                     f"{_mean_std([r['war'] for r in rs])} | {_mean_std([r['au_f1'] for r in rs])} | "
                     f"{_mean_std([r['au_auc'] for r in rs])} |")
    table = "\n".join(lines)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    return table


def _main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = cli.ScriptArgumentParser(prog="ssm_sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=cli.output_folder, default=os.path.join("runs", "sweep"))
    p.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, choices=sorted(CONFIGS))
    p.add_argument("--seeds", nargs="*", type=cli.nonnegative_int, default=[0, 1, 2])
    p.add_argument("--table", action="store_true", help="only print / write the table from results.jsonl")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    args = p.parse_args(argv)
    if not args.table:
        for name in args.configs:  # every run's arguments are checked before the first run starts
            flags, _ = CONFIGS[name]
            R.validate_args(R.build_parser().parse_args([*flags, "--out", os.path.join(args.out, "check"), *extra]))
        run_sweep(args.out, args.configs, args.seeds, extra)
    elif not os.path.isfile(os.path.join(args.out, "results.jsonl")):
        raise cli.UsageError(f"--table: no results yet (expected {os.path.join(args.out, 'results.jsonl')}, got no such file)")
    print(make_table(args.out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``error: ...`` + exit code 2 for every user error (``--debug``: traceback)."""
    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
