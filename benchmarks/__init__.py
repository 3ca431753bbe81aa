"""Benchmarks for kfqn_jax: offline data, a problem zoo and a side-by-side runner.

Run ``python -m benchmarks.run --help``; see ``benchmarks/README.md``. Nothing in the library
or its tests imports this package, except the smoke tests of the benchmarks themselves.
"""
