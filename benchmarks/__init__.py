"""Benchmarks for the Strawberry course (issue 9): `python -m benchmarks.<name>`.

Hand-written, not exported from a notebook. Each script prints a table and writes JSON
(default runs/benchmarks/<name>.json) that notebook 09 reads.
"""
