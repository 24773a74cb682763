"""Everything about the model: data, LoRA / QLoRA / full training, evaluation, the adapter registry,
merge and export, and the answer engine."""
