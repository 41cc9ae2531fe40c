"""Side-by-side benchmarks of kronix-data, its peers and plain SQL (see benchmarks/README.md).

Run from the repository root: ``python -m benchmarks.run --help`` for one figure,
``python -m benchmarks.matrix --help`` for the whole table.
"""
