"""Loading checkpoints (ours and Hugging Face's) into a placed model, and the embedded demo model."""
