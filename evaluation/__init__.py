"""Evaluation: the study's retrieval metrics, the evaluation run, benchmarks and reports."""
