"""Side-by-side benchmarks against the reference libraries: ``python -m benchmarks.<name>``."""
