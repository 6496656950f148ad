"""Inference-time reasoning and knowledge: strategies, retrieval-augmented prompting."""
