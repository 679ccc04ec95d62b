"""Embeddings: the encoder's sync and async front ends."""
