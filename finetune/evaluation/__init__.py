"""Evaluation: the metrics an adapter is measured by (metrics), whether it reproduces training answers
(reproduction), and the promotion gate that compares two (gate)."""
