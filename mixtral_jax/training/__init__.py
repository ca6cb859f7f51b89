"""Training: packed datasets and the fine-tuning loop."""
