"""Compression: quantization (PTQ, QAT), pruning, distillation, export."""
