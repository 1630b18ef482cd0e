"""fastkd: fused knowledge-distillation losses for large-vocabulary language models."""
from . import reference
from .api import KDLoss, kd_loss

__all__ = ["kd_loss", "KDLoss", "reference"]
__version__ = "0.1.0"
