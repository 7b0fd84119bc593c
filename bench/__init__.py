"""Benchmark harness (not tests): each sandbox runtime side by side with a local ipykernel.

``python -m bench`` (``make bench``) measures start-to-ready, execute round-trips, output
throughput, snapshot and rollback, a papermill batch on the VM runtime, and the host memory
and disk each sandbox costs; it prints one table with median, p90, the ratio to the local
kernel and whether each goal is met, and writes JSON and a PNG under ``bench/results/``.
How to read each figure: ``bench/README.md``.
"""
