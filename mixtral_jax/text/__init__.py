"""Text: tokenizers, chat templates and tool calls (no JAX)."""
