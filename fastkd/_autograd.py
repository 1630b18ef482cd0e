"""The autograd Function of the fused loss: forward runs a backend's fused kernel, which
writes the gradient too; backward only rescales that stored gradient by ``grad_output``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._checks import reduction_scale
from ._dispatch import get_backend
from .backends import KernelBackend, loss_dtype
from .config import KDConfig


def _kernels(backend):
    """A backend by name, or a KernelBackend given as is (the vocab-parallel loss passes
    one whose forward runs the per-shard phases and their collectives)."""
    return backend if isinstance(backend, KernelBackend) else get_backend(backend)


def _fused_forward(ctx, student, grad_scale, backend_name, reduced, inplace, run, run_inplace):
    """The forward of every fused loss: ``run(scale) -> (loss rows, grad)`` or
    ``run_inplace(scale) -> loss rows`` (the gradient written over ``student``)."""
    # fp16 cannot hold the scaled gradient: with reduction="mean" over thousands of
    # tokens most entries fall below its smallest subnormal, and no GradScaler brings
    # them back. So an fp16 gradient is stored unscaled (its entries are O(alpha T + 1))
    # and the scale is applied with grad_output in fp32 in backward, rounded once.
    deferred = student.dtype == torch.float16 and reduced
    kernel_scale = torch.ones_like(grad_scale) if deferred else grad_scale
    if inplace:
        loss_rows = run_inplace(kernel_scale)
        grad = student
        if not torch.compiler.is_compiling():
            # The logits now hold their gradient: bump their version so that autograd
            # refuses any graph node that saved them ("modified by an inplace
            # operation"), as a mutating op does. (Compiled graphs record the
            # mutation themselves.)
            torch.autograd.graph.increment_version(student)
    else:
        loss_rows, grad = run(kernel_scale)
    ctx.save_for_backward(grad, grad_scale if deferred else None)
    ctx.backend_name = backend_name
    if reduced:
        return loss_rows.sum() * grad_scale
    return loss_rows


def _fused_forward_with_stats(ctx, student, grad_scale, backend_name, reduced, inplace, run, run_inplace):
    """:func:`_fused_forward` of a forward that also returns the stats table: ``run(scale) ->
    (loss rows, grad, stats)``, ``run_inplace(scale) -> (loss rows, stats)``; returns (loss,
    stats), the stats without gradient."""
    out = {}

    def rows_and_grad(scale):
        rows, grad, out["stats"] = run(scale)
        return rows, grad

    def rows_inplace(scale):
        rows, out["stats"] = run_inplace(scale)
        return rows

    loss = _fused_forward(ctx, student, grad_scale, backend_name, reduced, inplace, rows_and_grad, rows_inplace)
    ctx.mark_non_differentiable(out["stats"])
    return loss, out["stats"]


def _fused_backward(ctx, grad_output) -> torch.Tensor:
    if getattr(ctx, "consumed", False):
        raise RuntimeError(
            "fastkd: the fused loss keeps one copy of its gradient and rescales it in place, "
            "so it can be backpropagated only once (retain_graph=True is not supported)")
    ctx.consumed = True
    grad, deferred_scale = ctx.saved_tensors
    factor = grad_output.to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    if deferred_scale is not None:
        factor = factor * deferred_scale
    _kernels(ctx.backend_name).scale_grad_(grad, factor)
    return grad


class KDLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, grad_scale, backend_name, reduced, inplace, cfg):
        kernels = _kernels(backend_name)
        return _fused_forward(
            ctx, student, grad_scale, backend_name, reduced, inplace,
            lambda scale: kernels.forward(student, teacher, labels, scale, cfg),
            lambda scale: kernels.forward_inplace(student, teacher, labels, scale, cfg))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        return (_fused_backward(ctx, grad_output),) + (None,) * 7


class SparseKDLossFunction(torch.autograd.Function):
    """The sparse-teacher twin of :class:`KDLossFunction` (teacher: ids and log-probs)."""

    @staticmethod
    def forward(ctx, student, ids, logprobs, labels, grad_scale, backend_name, reduced, inplace, cfg):
        kernels = _kernels(backend_name)
        return _fused_forward(
            ctx, student, grad_scale, backend_name, reduced, inplace,
            lambda scale: kernels.sparse_forward(student, ids, logprobs, labels, scale, cfg),
            lambda scale: kernels.sparse_forward_inplace(student, ids, logprobs, labels, scale, cfg))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        return (_fused_backward(ctx, grad_output),) + (None,) * 8


class KDLossStatsFunction(torch.autograd.Function):
    """:class:`KDLossFunction` that also returns the kernel's per-token diagnostics
    (``[N, STATS_WIDTH]``, no gradient): ``return_stats=True``."""

    @staticmethod
    def forward(ctx, student, teacher, labels, grad_scale, backend_name, reduced, inplace, cfg):
        kernels = _kernels(backend_name)
        return _fused_forward_with_stats(
            ctx, student, grad_scale, backend_name, reduced, inplace,
            lambda scale: kernels.forward_stats(student, teacher, labels, scale, cfg),
            lambda scale: kernels.forward_stats_inplace(student, teacher, labels, scale, cfg))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_stats):
        return (_fused_backward(ctx, grad_output),) + (None,) * 7


class SparseKDLossStatsFunction(torch.autograd.Function):
    """:class:`SparseKDLossFunction` with the per-token diagnostics (``return_stats=True``)."""

    @staticmethod
    def forward(ctx, student, ids, logprobs, labels, grad_scale, backend_name, reduced, inplace, cfg):
        kernels = _kernels(backend_name)
        return _fused_forward_with_stats(
            ctx, student, grad_scale, backend_name, reduced, inplace,
            lambda scale: kernels.sparse_forward_stats(student, ids, logprobs, labels, scale, cfg),
            lambda scale: kernels.sparse_forward_stats_inplace(student, ids, logprobs, labels, scale, cfg))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_stats):
        return (_fused_backward(ctx, grad_output),) + (None,) * 8


class MultiKDLossFunction(torch.autograd.Function):
    """The several-teachers twin of :class:`KDLossFunction` (``teachers`` a tuple of K
    constants, ``weights`` [K, N]); for backends that run it fused (backends/__init__.py)."""

    @staticmethod
    def forward(ctx, student, teachers, weights, labels, grad_scale, backend_name, reduced, inplace, cfg):
        kernels = _kernels(backend_name)
        return _fused_forward(
            ctx, student, grad_scale, backend_name, reduced, inplace,
            lambda scale: kernels.multi_forward(student, teachers, weights, labels, scale, cfg),
            lambda scale: kernels.multi_forward_inplace(student, teachers, weights, labels, scale, cfg))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        return (_fused_backward(ctx, grad_output),) + (None,) * 8


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with unit stride along V (a view when the layout allows it)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _flat_labels(labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[...] labels -> the contiguous int64 [N] the operators take."""
    return None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()


def fused_kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                  cfg: KDConfig, num_items, backend: str, inplace: bool, with_stats: bool = False):
    """A backend's fused kernel on checked input: the reduced loss (or the per-token loss);
    with ``with_stats``, (loss, the [N, STATS_WIDTH] per-token diagnostics)."""
    lead = student.shape[:-1]
    s2, t2 = _as_rows(student), _as_rows(teacher)
    flat_labels = _flat_labels(labels)
    # In the loss's dtype: a float32 scale would cost float64 input its 1e-12 precision.
    grad_scale = reduction_scale(flat_labels, s2.shape[0], cfg, num_items, student.device,
                                 loss_dtype(student, teacher))
    reduced = cfg.reduction != "none"
    function = KDLossStatsFunction if with_stats else KDLossFunction
    out = function.apply(s2, t2.detach(), flat_labels, grad_scale, backend, reduced, inplace, cfg)
    return _shaped(out, reduced, lead)


def _shaped(out, reduced: bool, lead):
    """The loss (reduced, or per token in the token shape), and the stats table when there is one."""
    loss, stats = out if isinstance(out, tuple) else (out, None)
    loss = loss if reduced else loss.reshape(lead)
    return loss if stats is None else (loss, stats)


def fused_sparse_kd_loss(student: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                         labels: Optional[torch.Tensor], cfg, num_items, backend: str,
                         inplace: bool, with_stats: bool = False):
    """A backend's fused sparse kernel on checked input: the reduced (or per-token) loss;
    with ``with_stats``, (loss, the [N, STATS_WIDTH] per-token diagnostics)."""
    lead = student.shape[:-1]
    s2 = _as_rows(student)
    K = teacher_ids.shape[-1]
    ids = teacher_ids.reshape(-1, K).contiguous()
    logprobs = teacher_logprobs.detach().reshape(-1, K).contiguous()
    flat_labels = _flat_labels(labels)
    grad_scale = reduction_scale(flat_labels, s2.shape[0], cfg, num_items, student.device,
                                 loss_dtype(student, logprobs))
    reduced = cfg.reduction != "none"
    function = SparseKDLossStatsFunction if with_stats else SparseKDLossFunction
    out = function.apply(s2, ids, logprobs, flat_labels, grad_scale, backend, reduced, inplace, cfg)
    return _shaped(out, reduced, lead)


def fused_multi_kd_loss(student: torch.Tensor, teachers, weights: torch.Tensor, labels: Optional[torch.Tensor],
                        cfg: KDConfig, num_items, backend, inplace: bool) -> torch.Tensor:
    """A backend's fused several-teachers forward on checked input (``weights`` [K, N])."""
    lead = student.shape[:-1]
    s2 = _as_rows(student)
    ts = tuple(_as_rows(t).detach() for t in teachers)
    flat_labels = _flat_labels(labels)
    grad_scale = reduction_scale(flat_labels, s2.shape[0], cfg, num_items, student.device,
                                 loss_dtype(student, *ts))
    reduced = cfg.reduction != "none"
    out = MultiKDLossFunction.apply(s2, ts, weights, flat_labels, grad_scale, backend, reduced, inplace, cfg)
    return out if reduced else out.reshape(lead)
