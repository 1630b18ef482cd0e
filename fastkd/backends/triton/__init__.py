"""The Triton backend: fused KD loss and gradient kernels, registered as torch.library ops.

    rows.py        row machinery every kernel shares: int64 row addressing, paired loads
                   (peeled rows: 16-byte vectors at odd V), exp2 anchors, and the helpers
                   of the three phases below
    launch.py      launch decisions: block sizes, single/multi-block path, warps, the peel,
                   the vocabulary split, the device guard every launch runs under, and
                   the configuration classes the sm_90 no-spill check compiles
    dense.py       the dense KD kernel (all divergences, CE, the logit options) and the
                   row_stats kernel, with the math, then their launchers
    sparse.py      the sparse-teacher kernel (K ids and log-probs per token; every tail and
                   divergence, CE) in two passes over the row, with the math, then its launcher
    multi.py       the several-teachers kernel (1 to MAX_KERNEL_TEACHERS dense teachers, mixture
                   or weighted sum, per-token weights; a teacher of weight 0 in a row is not
                   read there), with the math, then its launcher
    split.py       the dense forward with each row's columns split across programs (few
                   rows at a large V: launch.vocab_splits), in three passes
    scale_grad.py  backward: the stored gradient times grad_output, in place
    shard.py       the vocab-parallel loss's per-shard phases (fastkd/distributed)
    __init__.py    the operators (with fake implementations) and ``backend()``

Every kernel runs the phases that carry these names in every backend:

    row_stats   per row and side: max and sum-exp, plus the T = 1 raw sum-exp for CE (or z-loss)
    row_sums    per row, given the stats: the divergence value and the row sums the
                gradient needs (the centring sums of reverse_kl / jsd, tvd's side masses)
    write_grad  per element: the gradient times the reduction scale, zero past vocab_size

On a CPU-only machine the kernels run under the Triton interpreter (TRITON_INTERPRET=1 set
before triton is imported).
"""
from typing import List, Optional, Tuple

import torch

from ...config import KernelSettings, MultiKernelSettings, SparseKernelSettings
from .. import (KernelBackend, ShardPhases, fake_forward, fake_forward_inplace, fake_multi_forward,
               fake_multi_forward_inplace, fake_row_stats, fake_scale_grad_, fake_shard_row_stats, fake_shard_row_sums,
               fake_shard_write_grad, fake_sparse_forward, fake_sparse_forward_inplace)
# launch, rows, split: tests and the sm_90 check
from . import dense, launch, multi, rows, scale_grad, shard, sparse, split  # noqa: F401
from .. import (fake_forward_stats, fake_forward_stats_inplace, fake_sparse_forward_stats,  # return_stats
                fake_sparse_forward_stats_inplace)
from .launch import MAX_BLOCK, SINGLE_BLOCK_MAX, LaunchConfig, config_classes, launch_config  # noqa: F401
from .rows import kernels_interpreted

# ---------------------------------------------------------------------------------------
# torch.library operators (the contract of fastkd/backends/__init__.py) with fake
# implementations. The settings arrive packed (fastkd/config.py: ints a list, floats a
# float64 host tensor) and are unpacked by name; KernelSettings reads the floats with
# .tolist() inside the operator, where torch.compile does not trace.


@torch.library.custom_op("fastkd::triton_kd_forward", mutates_args=())
def triton_kd_forward(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                      grad_scale: torch.Tensor, row_stats: Optional[torch.Tensor], ints: List[int],
                      floats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return dense.forward(student, teacher, labels, grad_scale, row_stats, KernelSettings(ints, floats))


@torch.library.custom_op("fastkd::triton_kd_forward_inplace", mutates_args=("student",))
def triton_kd_forward_inplace(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                              grad_scale: torch.Tensor, row_stats: Optional[torch.Tensor], ints: List[int],
                              floats: torch.Tensor) -> torch.Tensor:
    return dense.forward_inplace(student, teacher, labels, grad_scale, row_stats, KernelSettings(ints, floats))


@torch.library.custom_op("fastkd::triton_scale_grad_", mutates_args=("grad",))
def triton_scale_grad_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    scale_grad.scale_grad_(grad, factor)


@torch.library.custom_op("fastkd::triton_row_stats", mutates_args=())
def triton_row_stats(student: torch.Tensor, teacher: torch.Tensor, ints: List[int], floats: torch.Tensor) -> torch.Tensor:
    return dense.row_stats(student, teacher, KernelSettings(ints, floats))


@torch.library.custom_op("fastkd::triton_shard_row_stats", mutates_args=())
def triton_shard_row_stats(student: torch.Tensor, teacher: torch.Tensor, ints: List[int],
                           floats: torch.Tensor) -> torch.Tensor:
    return shard.row_stats(student, teacher, KernelSettings(ints, floats))


@torch.library.custom_op("fastkd::triton_shard_row_sums", mutates_args=())
def triton_shard_row_sums(student: torch.Tensor, teacher: torch.Tensor, row_stats: torch.Tensor, ints: List[int],
                          floats: torch.Tensor) -> torch.Tensor:
    return shard.row_sums(student, teacher, row_stats, KernelSettings(ints, floats))


@torch.library.custom_op("fastkd::triton_shard_write_grad", mutates_args=())
def triton_shard_write_grad(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                            grad_scale: torch.Tensor, row_stats: torch.Tensor, row_sums: Optional[torch.Tensor],
                            vocab_start: int, ints: List[int], floats: torch.Tensor) -> torch.Tensor:
    return shard.write_grad(student, teacher, labels, grad_scale, row_stats, row_sums, vocab_start,
                            KernelSettings(ints, floats))


@torch.library.custom_op("fastkd::triton_sparse_kd_forward", mutates_args=())
def triton_sparse_kd_forward(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                             labels: Optional[torch.Tensor], grad_scale: torch.Tensor, ints: List[int],
                             floats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return sparse.forward(student, ids, logprobs, labels, grad_scale, SparseKernelSettings(ints, floats))


@torch.library.custom_op("fastkd::triton_sparse_kd_forward_inplace", mutates_args=("student",))
def triton_sparse_kd_forward_inplace(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                                     labels: Optional[torch.Tensor], grad_scale: torch.Tensor, ints: List[int],
                                     floats: torch.Tensor) -> torch.Tensor:
    return sparse.forward_inplace(student, ids, logprobs, labels, grad_scale, SparseKernelSettings(ints, floats))


@torch.library.custom_op("fastkd::triton_kd_multi_forward", mutates_args=())
def triton_kd_multi_forward(student: torch.Tensor, teachers: List[torch.Tensor], weights: torch.Tensor,
                            labels: Optional[torch.Tensor], grad_scale: torch.Tensor, ints: List[int],
                            floats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return multi.forward(student, teachers, weights, labels, grad_scale, MultiKernelSettings(ints, floats))


@torch.library.custom_op("fastkd::triton_kd_multi_forward_inplace", mutates_args=("student",))
def triton_kd_multi_forward_inplace(student: torch.Tensor, teachers: List[torch.Tensor], weights: torch.Tensor,
                                    labels: Optional[torch.Tensor], grad_scale: torch.Tensor, ints: List[int],
                                    floats: torch.Tensor) -> torch.Tensor:
    return multi.forward_inplace(student, teachers, weights, labels, grad_scale, MultiKernelSettings(ints, floats))


# The forwards with the per-token diagnostics (return_stats=True): the contract's stats table.
@torch.library.custom_op("fastkd::triton_kd_forward_stats", mutates_args=())
def triton_kd_forward_stats(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                            grad_scale: torch.Tensor, ints: List[int],
                            floats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dense.forward_stats(student, teacher, labels, grad_scale, KernelSettings(ints, floats))


@torch.library.custom_op("fastkd::triton_kd_forward_stats_inplace", mutates_args=("student",))
def triton_kd_forward_stats_inplace(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                                    grad_scale: torch.Tensor, ints: List[int],
                                    floats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return dense.forward_stats_inplace(student, teacher, labels, grad_scale, KernelSettings(ints, floats))


@torch.library.custom_op("fastkd::triton_sparse_kd_forward_stats", mutates_args=())
def triton_sparse_kd_forward_stats(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                                   labels: Optional[torch.Tensor], grad_scale: torch.Tensor, ints: List[int],
                                   floats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return sparse.forward_stats(student, ids, logprobs, labels, grad_scale, SparseKernelSettings(ints, floats))


@torch.library.custom_op("fastkd::triton_sparse_kd_forward_stats_inplace", mutates_args=("student",))
def triton_sparse_kd_forward_stats_inplace(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                                           labels: Optional[torch.Tensor], grad_scale: torch.Tensor, ints: List[int],
                                           floats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return sparse.forward_stats_inplace(student, ids, logprobs, labels, grad_scale,
                                        SparseKernelSettings(ints, floats))


triton_kd_forward_stats.register_fake(fake_forward_stats)
triton_kd_forward_stats_inplace.register_fake(fake_forward_stats_inplace)
triton_sparse_kd_forward_stats.register_fake(fake_sparse_forward_stats)
triton_sparse_kd_forward_stats_inplace.register_fake(fake_sparse_forward_stats_inplace)
triton_kd_forward.register_fake(fake_forward)
triton_kd_multi_forward.register_fake(fake_multi_forward)
triton_kd_multi_forward_inplace.register_fake(fake_multi_forward_inplace)
triton_sparse_kd_forward.register_fake(fake_sparse_forward)
triton_sparse_kd_forward_inplace.register_fake(fake_sparse_forward_inplace)
triton_kd_forward_inplace.register_fake(fake_forward_inplace)
triton_scale_grad_.register_fake(fake_scale_grad_)
triton_row_stats.register_fake(fake_row_stats)
triton_shard_row_stats.register_fake(fake_shard_row_stats)
triton_shard_row_sums.register_fake(fake_shard_row_sums)
triton_shard_write_grad.register_fake(fake_shard_write_grad)

row_stats = torch.ops.fastkd.triton_row_stats


def _supports(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and kernels_interpreted()


def _forward(student, teacher, labels, grad_scale, cfg, row_stats=None):
    return torch.ops.fastkd.triton_kd_forward(student, teacher, labels, grad_scale, row_stats, *cfg.kernel_settings())


def _forward_inplace(student, teacher, labels, grad_scale, cfg, row_stats=None):
    return torch.ops.fastkd.triton_kd_forward_inplace(student, teacher, labels, grad_scale, row_stats,
                                                      *cfg.kernel_settings())


def _shard_phases() -> ShardPhases:
    ops = torch.ops.fastkd
    return ShardPhases(
        lambda student, teacher, cfg: ops.triton_shard_row_stats(student, teacher, *cfg.kernel_settings()),
        lambda student, teacher, stats, cfg: ops.triton_shard_row_sums(student, teacher, stats,
                                                                       *cfg.kernel_settings()),
        lambda student, teacher, labels, grad_scale, stats, sums, vocab_start, cfg: ops.triton_shard_write_grad(
            student, teacher, labels, grad_scale, stats, sums, vocab_start, *cfg.kernel_settings()))


def _sparse_forward(student, ids, logprobs, labels, grad_scale, cfg):
    return torch.ops.fastkd.triton_sparse_kd_forward(student, ids, logprobs, labels, grad_scale,
                                                     *cfg.kernel_settings())


def _sparse_forward_inplace(student, ids, logprobs, labels, grad_scale, cfg):
    return torch.ops.fastkd.triton_sparse_kd_forward_inplace(student, ids, logprobs, labels, grad_scale,
                                                             *cfg.kernel_settings())


def _multi_forward(student, teachers, weights, labels, grad_scale, cfg):
    return torch.ops.fastkd.triton_kd_multi_forward(student, list(teachers), weights, labels, grad_scale,
                                                    *cfg.multi_kernel_settings())


def _multi_forward_inplace(student, teachers, weights, labels, grad_scale, cfg):
    return torch.ops.fastkd.triton_kd_multi_forward_inplace(student, list(teachers), weights, labels, grad_scale,
                                                            *cfg.multi_kernel_settings())


def _forward_stats(student, teacher, labels, grad_scale, cfg):
    return torch.ops.fastkd.triton_kd_forward_stats(student, teacher, labels, grad_scale, *cfg.kernel_settings())


def _forward_stats_inplace(student, teacher, labels, grad_scale, cfg):
    return torch.ops.fastkd.triton_kd_forward_stats_inplace(student, teacher, labels, grad_scale,
                                                            *cfg.kernel_settings())


def _sparse_forward_stats(student, ids, logprobs, labels, grad_scale, cfg):
    return torch.ops.fastkd.triton_sparse_kd_forward_stats(student, ids, logprobs, labels, grad_scale,
                                                           *cfg.kernel_settings())


def _sparse_forward_stats_inplace(student, ids, logprobs, labels, grad_scale, cfg):
    return torch.ops.fastkd.triton_sparse_kd_forward_stats_inplace(student, ids, logprobs, labels, grad_scale,
                                                                   *cfg.kernel_settings())


def backend() -> KernelBackend:
    return KernelBackend("triton", _forward, _forward_inplace, torch.ops.fastkd.triton_scale_grad_, _supports,
                         shard=_shard_phases(), sparse_forward=_sparse_forward,
                         sparse_forward_inplace=_sparse_forward_inplace, multi_forward=_multi_forward,
                         multi_forward_inplace=_multi_forward_inplace,
                         forward_stats=_forward_stats, forward_stats_inplace=_forward_stats_inplace,
                         sparse_forward_stats=_sparse_forward_stats,
                         sparse_forward_stats_inplace=_sparse_forward_stats_inplace)
