"""Serving: the OpenAI-compatible HTTP app over the engine."""
