"""Bit-width policies: one activation bit-width per LR patch (layer-invariant)."""

from .base import BitPolicy
from .entropy import EntropyOnly, patch_entropy
from .static import Static

__all__ = ["BitPolicy", "EntropyOnly", "Static", "patch_entropy"]
