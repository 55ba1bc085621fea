"""wsgate benchmarks: ``python -m bench --help`` (docs/performance.md)."""
