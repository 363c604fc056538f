"""Stand-alone benchmark scripts (``python -m benchmarks.<name>``); not imported by cbmir itself."""
