"""Metric-learning losses over labelled embeddings: triplet, margin, multi-similarity, proxies."""

__all__: list[str] = []
