"""benchmarks/bench_report.py: the comparison table printed after `pytest benchmarks --benchmark`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _load_bench_report():
    """``benchmarks/bench_report.py`` loaded from its path (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_report.py"
    spec = importlib.util.spec_from_file_location("_facelayers_bench_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_bench_report = _load_bench_report()
comparison_rows, comparison_table, set_role = (
    _bench_report.comparison_rows, _bench_report.comparison_table, _bench_report.set_role)


def test_ratios_are_relative_to_the_group_baseline_and_roofline():
    rows = comparison_rows([
        dict(group="moe N=10", name="fast", median=0.5),
        dict(group="moe N=10", name="slow", median=2.0, role="baseline"),
        dict(group="moe N=10", name="ideal", median=0.25, role="roofline"),
        dict(group="moe N=9", name="alone", median=1.0),
    ])
    by = {(r["group"], r["name"]): r for r in rows}
    assert [r["group"] for r in rows][0] == "moe N=9"  # natural sort: 9 before 10
    assert by["moe N=10", "fast"]["speedup"] == pytest.approx(4.0)
    assert by["moe N=10", "fast"]["roofline_fraction"] == pytest.approx(0.5)
    assert by["moe N=10", "slow"]["speedup"] == pytest.approx(1.0)
    assert by["moe N=9", "alone"]["speedup"] is None
    md = comparison_table([dict(group="g", name="a", median=0.002, role="baseline")], markdown=True)
    assert md.splitlines()[2] == "| g | a [baseline] | 2.00 | 1.00 |  |"


def test_set_role_validates():
    class Fake:
        extra_info: dict = {}

    fake = Fake()
    set_role(fake, "baseline")
    assert fake.extra_info["role"] == "baseline"
    with pytest.raises(ValueError, match="role must be"):
        set_role(fake, "best")
