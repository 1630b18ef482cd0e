"""fastkd: fused knowledge-distillation losses for large-vocabulary language models."""
from . import distributed, reference, sparse_reference
from ._dispatch import resolve_backend
from .api import KDLoss, kd_loss
from .backends.cpp import empty_cpu_grad_cache
from .config import KDConfig, SparseKDConfig, make_config
from .features import FeatureDistillation, feature_loss
from .fused_linear import FusedLinearKDLoss, fused_linear_kd_loss
from .fused_linear_sparse import FusedLinearSparseKDLoss, fused_linear_sparse_kd_loss
from .objective import DistillationLoss
from .relations import (RelationDistillation, pool_hidden_states, rkd_angle_loss, rkd_distance_loss,
                        similarity_preserving_loss)
from .sparse import SparseKDLoss, sparse_kd_loss
from .stats import KDStats, SparseKDStats, kd_stats, sparse_kd_stats

__all__ = ["kd_loss", "KDLoss", "fused_linear_kd_loss", "FusedLinearKDLoss", "KDConfig", "make_config", "resolve_backend",
           "reference", "empty_cpu_grad_cache",
           # feature and relation distillation
           "feature_loss", "FeatureDistillation", "rkd_distance_loss", "rkd_angle_loss", "similarity_preserving_loss",
           "pool_hidden_states", "RelationDistillation",
           # the three families in one objective
           "DistillationLoss",
           # sparse (top-k / sampled) teachers; the on-disk cache is fastkd.teacher_cache (numpy)
           "sparse_kd_loss", "SparseKDLoss", "fused_linear_sparse_kd_loss", "FusedLinearSparseKDLoss",
           "SparseKDConfig", "sparse_reference",
           # per-token diagnostics (docs/diagnostics.md)
           "kd_stats", "sparse_kd_stats", "KDStats", "SparseKDStats",
           # past one GPU: fastkd.distributed (vocab-parallel losses, global_num_items)
           "distributed"]
__version__ = "0.1.0"


def __getattr__(name):
    # fastkd.teacher_cache needs numpy: imported on first use, not at `import fastkd`.
    if name == "teacher_cache":
        import importlib

        return importlib.import_module(".teacher_cache", __name__)
    raise AttributeError(f"module 'fastkd' has no attribute {name!r}")
