"""A pytest plugin that records where a run's time goes: wall time per test file.

At the end of the session it prints a table and appends the rows to
``test-artifacts/phases.tsv`` (phase, seconds, tests, outcome), which ``.ci/run`` reads to print
one table for the whole CI run (set-up, each suite, soak).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


class Phases:
    """Sums each test file's setup, call and teardown durations."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.tests: dict[str, int] = defaultdict(int)
        self.failed: set[str] = set()
        self.started = time.monotonic()

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        phase = report.nodeid.split("::")[0]
        self.seconds[phase] += report.duration
        if report.when == "call":
            self.tests[phase] += 1
        if report.failed:
            self.failed.add(phase)

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.seconds:
            return
        total = time.monotonic() - self.started
        rows = sorted(self.seconds.items(), key=lambda kv: -kv[1])
        terminalreporter.section("where the time went (wall seconds per test file)")
        for phase, seconds in rows:
            mark = "  FAILED" if phase in self.failed else ""
            terminalreporter.write_line(f"{seconds:8.1f}  {self.tests[phase]:4d} tests  {phase}{mark}")
        terminalreporter.write_line(f"{total:8.1f}  session total")
        ARTIFACTS.mkdir(exist_ok=True)
        label = os.environ.get("SANDBOX_KERNELS_PHASE_PREFIX", "")
        with open(ARTIFACTS / "phases.tsv", "a") as f:
            for phase, seconds in rows:
                outcome = "failed" if phase in self.failed else "passed"
                f.write(f"{label}{phase}\t{seconds:.1f}\t{self.tests[phase]}\t{outcome}\n")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(Phases(), "sandbox-kernels-phases")
