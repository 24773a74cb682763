"""Evaluation: the metrics an adapter is measured by (metrics) and the promotion gate that compares two (gate).
Whether a model reproduces its training answers is finetune.training.reproduction, shared with the trainer's
early stop."""
