"""The ``torch`` backend: ``fastkd.reference`` run as a backend, its gradient by autograd.

Runs anywhere PyTorch does, in every floating dtype, float64 included. ``kd_loss`` uses
its ``differentiable_loss`` (an ordinary autograd graph, so double backward and
``retain_graph`` work as in plain PyTorch); ``fused_linear_kd_loss`` calls its
``forward_inplace`` per chunk like any other backend's.
"""
from __future__ import annotations

import torch

from .. import reference, sparse_reference
from . import KernelBackend, reference_shard


def forward(student, teacher, labels, grad_scale, cfg, row_stats=None):
    if row_stats is not None:
        raise ValueError("fastkd: the torch backend computes its own row statistics")
    with torch.enable_grad():
        s = student.detach().requires_grad_(True)
        rows = reference.loss_per_row(s, teacher, labels, cfg)
        (grad,) = torch.autograd.grad(rows.sum() * grad_scale, s)
    return rows.detach(), grad.to(student.dtype)


def forward_inplace(student, teacher, labels, grad_scale, cfg, row_stats=None):
    rows, grad = forward(student, teacher, labels, grad_scale, cfg, row_stats)
    student.copy_(grad)
    return rows


def sparse_forward(student, ids, logprobs, labels, grad_scale, cfg):
    with torch.enable_grad():
        s = student.detach().requires_grad_(True)
        rows = sparse_reference.sparse_loss_per_row(s, ids, logprobs, labels, cfg)
        (grad,) = torch.autograd.grad(rows.sum() * grad_scale, s)
    return rows.detach(), grad.to(student.dtype)


def sparse_forward_inplace(student, ids, logprobs, labels, grad_scale, cfg):
    rows, grad = sparse_forward(student, ids, logprobs, labels, grad_scale, cfg)
    student.copy_(grad)
    return rows


def scale_grad_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    grad.mul_(factor.to(grad.dtype) if factor.dim() == 0 else factor.to(grad.dtype).reshape(-1, 1))


def backend() -> KernelBackend:
    return KernelBackend("torch", forward, forward_inplace, scale_grad_, lambda device: True,
                         dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
                         differentiable_loss=reference.kd_loss_with_config, shard=reference_shard.phases(),
                         sparse_forward=sparse_forward, sparse_forward_inplace=sparse_forward_inplace,
                         differentiable_sparse_loss=sparse_reference.sparse_kd_loss_with_config)
