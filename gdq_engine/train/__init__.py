"""Training: FP pretraining of the shipped models (quantization-aware training comes later)."""
