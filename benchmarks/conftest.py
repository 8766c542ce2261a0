"""Benchmark session setup: ``pytest benchmarks --benchmark`` times, plain ``pytest benchmarks`` smoke-tests.

``--benchmark`` (registered here; pytest-benchmark itself only has ``--benchmark-*`` options, and an
exact option name is never taken as an abbreviation of those) enables pytest-benchmark's timing.
Without it ``--benchmark-disable`` is implied: every benchmark body runs exactly once, as a smoke
test (CI mode). Benchmark files can read the mode from the ``bench_timed`` fixture (e.g. to use a
smaller problem in smoke mode). At the end of a timed session a comparison table (median ms, speed-up
vs the group's baseline, fraction of the roofline) is printed; see ``bench_report.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from bench_report import comparison_table


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("facelayers", "facelayers benchmarks")
    group.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        dest="facelayers_benchmark",
        help="run the timed pytest-benchmark benchmarks (default: run each benchmark body once as a smoke test)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # Runs before pytest-benchmark's own (trylast) pytest_configure creates its session.
    if not hasattr(config.option, "benchmark_disable"):
        return  # pytest-benchmark not installed
    if config.getoption("facelayers_benchmark"):
        config.option.benchmark_disable = False
        config.option.benchmark_enable = True
    else:
        config.option.benchmark_disable = True
        config.option.benchmark_enable = False


@pytest.fixture(scope="session")
def bench_timed(request: pytest.FixtureRequest) -> bool:
    """True in a ``--benchmark`` (timed) session, False in smoke mode (session-scoped: usable anywhere)."""
    return bool(request.config.getoption("facelayers_benchmark"))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    session = getattr(config, "_benchmarksession", None)
    if session is None or not config.getoption("facelayers_benchmark"):
        return
    table = comparison_table(session.benchmarks)
    terminalreporter.write_sep("=", "facelayers comparison (medians; x baseline = baseline/row)")
    terminalreporter.write_line(table)
