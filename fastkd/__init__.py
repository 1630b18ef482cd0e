"""fastkd: fused knowledge-distillation losses for large-vocabulary language models."""
from . import reference
from ._dispatch import resolve_backend
from .api import KDLoss, kd_loss
from .backends.cpp import empty_cpu_grad_cache
from .config import KDConfig, make_config
from .features import FeatureDistillation, feature_loss
from .fused_linear import FusedLinearKDLoss, fused_linear_kd_loss
from .objective import DistillationLoss
from .relations import (RelationDistillation, pool_hidden_states, rkd_angle_loss, rkd_distance_loss,
                        similarity_preserving_loss)

__all__ = ["kd_loss", "KDLoss", "fused_linear_kd_loss", "FusedLinearKDLoss", "KDConfig", "make_config", "resolve_backend",
           "reference", "empty_cpu_grad_cache",
           # feature and relation distillation
           "feature_loss", "FeatureDistillation", "rkd_distance_loss", "rkd_angle_loss", "similarity_preserving_loss",
           "pool_hidden_states", "RelationDistillation",
           # the three families in one objective
           "DistillationLoss"]
__version__ = "0.1.0"
