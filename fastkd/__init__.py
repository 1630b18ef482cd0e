"""fastkd: fused knowledge-distillation losses for large-vocabulary language models."""
from . import reference
from ._dispatch import resolve_backend
from .api import KDLoss, kd_loss
from .backends.cpp import empty_cpu_grad_cache
from .config import KDConfig, make_config
from .fused_linear import FusedLinearKDLoss, fused_linear_kd_loss

__all__ = ["kd_loss", "KDLoss", "fused_linear_kd_loss", "FusedLinearKDLoss", "KDConfig", "make_config", "resolve_backend",
           "reference", "empty_cpu_grad_cache"]
__version__ = "0.1.0"
