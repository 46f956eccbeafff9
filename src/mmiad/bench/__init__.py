"""Benchmarks whose results go to ``BENCHMARKS.md``: stage timings, accuracy on synthetic data, comparisons.

Speed and memory are measured here, by commands anyone can re-run, never by timed tests.
"""
