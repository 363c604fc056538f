"""Benchmark scripts, each runnable with ``python -m cbmir.benchmarks.<name>``: ``bench`` (speed and
memory targets, also ``cbmir bench``), ``check_bruteforce``, ``volume_batching``, ``compile_speed``,
``recall``, ``service_load``; ``timing`` holds their one timing rule."""
