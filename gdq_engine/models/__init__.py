"""FP super-resolution architectures, checkpoint formats and named models."""

from .checkpoints import CheckpointError, build_model, save_checkpoint
from .common import SUPPORTED_SCALES, SRModel
from .edsr import EDSR, edsr_baseline, edsr_large
from .pretrained import from_pretrained, known_models, load_model
from .rdn import RDN
from .srresnet import MSRResNet

__all__ = ["CheckpointError", "EDSR", "MSRResNet", "RDN", "SRModel", "SUPPORTED_SCALES", "build_model",
           "edsr_baseline", "edsr_large", "from_pretrained", "known_models", "load_model", "save_checkpoint"]
