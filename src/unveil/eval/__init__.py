"""Evaluation: prediction parsing, torchmetrics-based metrics, and the evaluation task."""
