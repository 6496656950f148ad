"""posttrain: post-training for language models, one pipeline with every stage."""

__version__ = "0.1.0"
