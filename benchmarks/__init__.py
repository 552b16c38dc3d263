"""Benchmarks of visualizer: ``python -m benchmarks`` prints the tables in BENCHMARKS.md.

Every number is a ratio of variants measured side by side in one run
(interleaved round by round), never a timed assertion in the test suite.
"""
