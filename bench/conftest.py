"""Benchmark plumbing: thread count, and one summary line per benchmark printed after the run.

pytest captures ``print`` from passing tests, so the ratios the benchmarks exist to measure are
printed in the terminal summary instead, whether or not ``-s`` is given.

``EXPERTOPT_BENCH_THREADS=N`` sets torch's intra-op threads (default: torch's own choice). On a
shared 2-core machine two OpenMP threads stall whenever another process holds a core (tiny ops
measured up to 100x slower), so one thread gives steadier ratios there.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

__all__ = ["report_line"]

_SUMMARY_LINES = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SUMMARY_LINES] = []
    if threads := os.environ.get("EXPERTOPT_BENCH_THREADS"):
        torch.set_num_threads(int(threads))


@pytest.fixture
def report_line(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Append one line to the end-of-run summary."""
    return request.config.stash[_SUMMARY_LINES].append


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    lines = config.stash.get(_SUMMARY_LINES, [])
    if lines:
        terminalreporter.section("benchmark ratios (same run, medians)")
        for line in lines:
            terminalreporter.write_line(line)
