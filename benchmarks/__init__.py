"""Benchmarks, one script per measured figure. Run each from the repository root as a module,
`python -m benchmarks.<name>`, so that benchmarks/vq.py never shadows the vq package."""
