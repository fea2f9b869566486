"""gdq_engine: mixed-precision inference for image super-resolution.

Quick start::

    import gdq_engine
    engine = gdq_engine.Engine("edsr-baseline-x4")      # shipped FP weights, CPU or CUDA
    hr = engine.upscale(lr)                               # (N,3,H,W) float in [0,1] -> (N,3,4H,4W)
"""

import torch  # noqa: F401  (loads libtorch before the compiled extension)

from . import metrics
from .engine import Engine, UpscaleReport, upscale_file
from .models import CheckpointError, from_pretrained, known_models, load_model, save_checkpoint
from .quantized import QuantizedSR, load_quantized, quantize, save_quantized

__version__ = "0.1.0"

__all__ = ["CheckpointError", "Engine", "QuantizedSR", "UpscaleReport", "from_pretrained", "known_models",
           "load_model", "load_quantized", "metrics", "quantize", "save_checkpoint", "save_quantized", "upscale_file"]
