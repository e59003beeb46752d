"""Evaluation: lm-eval benchmarks and pass@k generation evals (`bitmamba eval`)."""
