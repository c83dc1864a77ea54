"""Evaluation: task files, metrics, needle tasks and the eval runner."""
