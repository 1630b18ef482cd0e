"""The ``torch`` backend: ``fastkd.reference`` run as a backend, its gradient by autograd.

Runs anywhere PyTorch does, in every floating dtype, float64 included. ``kd_loss`` uses
its ``differentiable_loss`` (an ordinary autograd graph, so double backward and
``retain_graph`` work as in plain PyTorch); ``fused_linear_kd_loss`` calls its
``forward_inplace`` per chunk like any other backend's. Several teachers run here and on the
backends of ``fastkd._dispatch.MULTI_TEACHER_BACKENDS`` (and here only beyond
``MAX_KERNEL_TEACHERS``).
"""
from __future__ import annotations

import torch

from .. import reference, sparse_reference
from . import KernelBackend, reference_shard


def _rows_and_grad(student, grad_scale, loss_rows):
    """(loss rows, d(sum rows * grad_scale)/d student) of ``loss_rows(student) -> [N]``, by autograd."""
    with torch.enable_grad():
        s = student.detach().requires_grad_(True)
        rows = loss_rows(s)
        (grad,) = torch.autograd.grad(rows.sum() * grad_scale, s)
    return rows.detach(), grad.to(student.dtype)


def forward(student, teacher, labels, grad_scale, cfg, row_stats=None):
    if row_stats is not None:
        raise ValueError("fastkd: the torch backend computes its own row statistics")
    return _rows_and_grad(student, grad_scale, lambda s: reference.loss_per_row(s, teacher, labels, cfg))


def sparse_forward(student, ids, logprobs, labels, grad_scale, cfg):
    return _rows_and_grad(student, grad_scale,
                          lambda s: sparse_reference.sparse_loss_per_row(s, ids, logprobs, labels, cfg))


def multi_forward(student, teachers, weights, labels, grad_scale, cfg):
    return _rows_and_grad(student, grad_scale,
                          lambda s: reference.multi_loss_per_row(s, teachers, weights, labels, cfg))


def forward_stats(student, teacher, labels, grad_scale, cfg):
    from ..stats import stats_rows  # fastkd.stats imports this package

    rows, grad = forward(student, teacher, labels, grad_scale, cfg)
    return rows, grad, stats_rows(student, teacher, labels, cfg)


def sparse_forward_stats(student, ids, logprobs, labels, grad_scale, cfg):
    from ..stats import sparse_stats_rows

    rows, grad = sparse_forward(student, ids, logprobs, labels, grad_scale, cfg)
    return rows, grad, sparse_stats_rows(student, ids, logprobs, labels, cfg)


def _inplace_with_stats(forward_fn):
    def forward_inplace(student, *args):
        rows, grad, stats = forward_fn(student, *args)
        student.copy_(grad)
        return rows, stats
    return forward_inplace


def _inplace(forward_fn):
    """The in-place form of a forward: the gradient copied over the student, the rows returned."""
    def forward_inplace(student, *args, **kwargs):
        rows, grad = forward_fn(student, *args, **kwargs)
        student.copy_(grad)
        return rows
    return forward_inplace


forward_inplace = _inplace(forward)
sparse_forward_inplace = _inplace(sparse_forward)
multi_forward_inplace = _inplace(multi_forward)
forward_stats_inplace = _inplace_with_stats(forward_stats)
sparse_forward_stats_inplace = _inplace_with_stats(sparse_forward_stats)


def scale_grad_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    grad.mul_(factor.to(grad.dtype) if factor.dim() == 0 else factor.to(grad.dtype).reshape(-1, 1))


def backend() -> KernelBackend:
    return KernelBackend("torch", forward, forward_inplace, scale_grad_, lambda device: True,
                         dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
                         differentiable_loss=reference.kd_loss_with_config, shard=reference_shard.phases(),
                         sparse_forward=sparse_forward, sparse_forward_inplace=sparse_forward_inplace,
                         differentiable_sparse_loss=sparse_reference.sparse_kd_loss_with_config,
                         multi_forward=multi_forward, multi_forward_inplace=multi_forward_inplace,
                         differentiable_multi_loss=reference.multi_kd_loss_with_config,
                         forward_stats=forward_stats, forward_stats_inplace=forward_stats_inplace,
                         sparse_forward_stats=sparse_forward_stats,
                         sparse_forward_stats_inplace=sparse_forward_stats_inplace)
