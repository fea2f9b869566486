"""Bit-width policies (Granular-DQ, CADyQ, static, entropy) arrive with the quantization core."""
