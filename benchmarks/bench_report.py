"""Comparison table for a ``pytest benchmarks --benchmark`` session (reusable by every benchmark file).

Conventions a benchmark follows to appear in the table:

- ``benchmark.group = "<what> <size>"``: rows are compared within a group;
- ``benchmark.extra_info["role"] = "baseline"`` on the row the others are compared with (the
  release-style path); ``"roofline"`` on an idealised reference (e.g. a plain matmul of the same
  FLOPs), if any. Use :func:`set_role`.

The table (median ms, speed-up vs the baseline = baseline median / row median, fraction of the
roofline = roofline median / row median) is printed by ``benchmarks/conftest.py`` at the end of a
``--benchmark`` session; :func:`comparison_table` also formats it for docs (``markdown=True``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

__all__ = ["set_role", "comparison_rows", "comparison_table"]


def set_role(benchmark: Any, role: str) -> None:
    """Mark a pytest-benchmark fixture as the group's "baseline" or "roofline" row."""
    if role not in ("baseline", "roofline"):
        raise ValueError(f"role must be 'baseline' or 'roofline', got {role!r}")
    benchmark.extra_info["role"] = role


def comparison_rows(benchmarks: Iterable[Any]) -> list[dict]:
    """Rows ``{group, name, median_ms, speedup, roofline_fraction}`` from pytest-benchmark metadata.

    Accepts pytest-benchmark's ``Metadata`` objects (``.group``, ``.name``, ``.stats.median``,
    ``.extra_info``) or plain dicts with the keys ``group``, ``name``, ``median`` (seconds), ``role``.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in benchmarks:
        if isinstance(b, dict):
            rec = dict(group=b.get("group") or "", name=b["name"], median=b["median"], role=b.get("role"))
        else:
            if not b.stats or not getattr(b.stats, "rounds", 0):
                continue
            rec = dict(group=b.group or "", name=b.name, median=b.stats.median, role=b.extra_info.get("role"))
        groups[rec["group"]].append(rec)
    rows = []
    for group in sorted(groups, key=_natural_key):
        recs = groups[group]
        base = next((r["median"] for r in recs if r["role"] == "baseline"), None)
        roof = next((r["median"] for r in recs if r["role"] == "roofline"), None)
        for r in recs:
            rows.append(dict(
                group=group,
                name=r["name"],
                median_ms=r["median"] * 1e3,
                speedup=None if base is None else base / r["median"],
                roofline_fraction=None if roof is None else roof / r["median"],
                role=r["role"] or "",
            ))
    return rows


def _natural_key(text: str) -> list:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def comparison_table(benchmarks: Iterable[Any], *, markdown: bool = False) -> str:
    """Format :func:`comparison_rows` as aligned text (or a Markdown table)."""
    rows = comparison_rows(benchmarks)
    header = ["group", "benchmark", "median ms", "x baseline", "of roofline"]
    body = []
    for r in rows:
        body.append([
            r["group"],
            r["name"] + (f" [{r['role']}]" if r["role"] else ""),
            f"{r['median_ms']:.2f}",
            "" if r["speedup"] is None else f"{r['speedup']:.2f}",
            "" if r["roofline_fraction"] is None else f"{100 * r['roofline_fraction']:.0f}%",
        ])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(header, *body)] if body else [len(h) for h in header]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in body])
