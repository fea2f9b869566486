"""Bit-width policies: one activation bit-width per LR patch (layer-invariant)."""

from .base import BitPolicy
from .cadyq import CADyQ, sobel_features
from .entropy import EntropyOnly, patch_entropy
from .granular import GBC, GranularDQ
from .static import Static

__all__ = ["CADyQ", "GBC", "BitPolicy", "EntropyOnly", "GranularDQ", "Static", "patch_entropy", "sobel_features"]
