"""Inference: sampling, the batched sampler, the continuous-batching engine, generate/chat."""
