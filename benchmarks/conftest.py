"""pytest setup of the benchmarks: ratio lines at the end of the run."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter) -> None:
    lines = [
        value
        for report in terminalreporter.stats.get("passed", [])
        for name, value in getattr(report, "user_properties", [])
        if name == "benchmark_summary"
    ]
    if lines:
        terminalreporter.write_sep("-", "speedup over the reference")
        for line in lines:
            terminalreporter.write_line(line)
