"""Training: the typed config (config), the LoRA guide's rank advice (recommend), training examples and their
encoding (data), the trainer (trainer), fused head/loss/dropout (fused), continued training (continuation)."""
