"""The model itself: loading a base model or adapter (finetune.model.loading), building the offline `tiny`
base (finetune.model.tiny), and the one prompt builder training and serving share (finetune.model.prompting)."""
