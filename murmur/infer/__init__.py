"""Inference: the continuous-batching engine, its KV cache, sampling and streaming detokenization."""
