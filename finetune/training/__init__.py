"""Training: the typed config (config), the LoRA guide's rank advice (recommend), training examples and their
encoding (data), the trainer (trainer) and what it is built from (model_setup, loop, sizing, memory, qlora,
checkpoints, fused), whether answers are reproduced (reproduction), the general text against forgetting
(general_text), continued training (continuation) and preference runs (preference)."""
