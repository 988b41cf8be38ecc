"""Benchmark suites (pytest-benchmark) and their report; see bench/README_SECTION.md."""
