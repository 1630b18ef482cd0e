"""The kernel backends and the contract each one implements.

A backend computes, for 2-D logits with unit stride along the vocabulary, the per-row
loss and its gradient in one fused pass, in three phases with the same names everywhere
(``csrc/cpu``, ``csrc/cuda``, ``backends/triton``):

    row_stats   per row and side: max and sum of exp (the softmax normaliser), and the
                T = 1 sum-exp of the cross-entropy term; shards of a row combine with a
                max and a rescaled sum, so the statistics may also come from outside
    row_sums    per row, given the statistics: the divergence's value and the row sums its
                gradient needs (for JSD and TVD the centring sums)
    write_grad  per element: the gradient, times the reduction's scale

The compiled backends expose them as operators with one schema (``torch.ops.fastkd.*``
for ``cpu``/``cuda``, ``torch.ops.fastkd.triton_*`` for ``triton``)::

    kd_forward(student, teacher, labels?, grad_scale, row_stats?, int[] ints, Tensor floats)
        -> (loss [N], grad)
    kd_forward_inplace(student!, ...same...) -> loss [N]    # the gradient overwrites student
    row_stats(student, teacher, int[] ints, Tensor floats) -> [N, ROW_STATS_WIDTH] float32
    scale_grad_(grad!, factor)                             # grad *= factor, skipped when 1

``ints``/``floats`` are :meth:`fastkd.config.KDConfig.kernel_settings`: the whole loss
description, in the order ``csrc/kd_params.h`` unpacks. ``floats`` is a float64 tensor
in host memory whatever the logits' device (the operators read it on the host): as a
tensor it stays a graph input under torch.compile, where a ``float[]`` specialised each
new temperature, alpha or beta (one recompile per value). ``loss`` is the per-row loss
before reduction (0 at ignored rows; float32, float64 for float64 input); ``grad`` is
d(sum_rows loss * grad_scale)/d student in the student's dtype. Folding the reduction's
scale into the kernel means backward only multiplies by ``grad_output``, and the kernels
skip even that when it is 1, without a host sync.

Backends register with ``fastkd._dispatch`` on first use; nothing here imports Triton or
loads the C++ extension.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from ..config import DIVERGENCES

ROW_STATS_WIDTH = 5  # (max_s, sumexp_s, max_t, sumexp_t, sumexp_raw); maxes in units of s/T
LOW_PRECISION_AND_FP32 = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class KernelBackend:
    """One backend: how it runs the fused forward, rescales a gradient, and where it runs.

    ``forward(student, teacher, labels, grad_scale, cfg) -> (loss rows, grad)`` and
    ``forward_inplace(...) -> loss rows`` take 2-D logits and a :class:`KDConfig` with
    ``vocab_size`` fixed. ``differentiable_loss(student, teacher, labels, cfg, num_items)``,
    where given, is the whole reduced loss as an ordinary autograd graph (the ``torch``
    reference), used by ``kd_loss`` instead of the fused autograd Function.
    """

    name: str
    forward: Callable
    forward_inplace: Callable
    scale_grad_: Callable
    supports: Callable[[torch.device], bool]
    dtypes: Tuple[torch.dtype, ...] = LOW_PRECISION_AND_FP32
    differentiable_loss: Optional[Callable] = None


# ---------------------------------------------------------------------------------------
# The operator contract's entry check, for operators written in Python (Triton). The C++
# operators have its twin in csrc/ops.cpp; both guard the contract, the user's input was
# checked before (fastkd/_checks.py).

def check_operator_args(student, teacher, labels, grad_scale, row_stats, k, dtypes) -> None:
    """Tensors and unpacked settings ``k`` (:class:`fastkd.config.KernelSettings`) of one call;
    ``grad_scale`` None for the row_stats operator."""
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"fastkd: student and teacher must be 2-D [N, V] with equal N, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.device != teacher.device:
        raise ValueError("fastkd: student and teacher are on different devices")
    if student.stride(1) != 1 or teacher.stride(1) != 1:
        raise ValueError("fastkd: logits need unit stride along the vocabulary")
    if student.dtype not in dtypes or teacher.dtype not in dtypes:
        raise TypeError(f"fastkd: this backend takes {', '.join(str(d).replace('torch.', '') for d in dtypes)} "
                        f"logits, got {student.dtype} and {teacher.dtype}")
    if not 1 <= k.vocab_size <= min(student.shape[1], teacher.shape[1]):
        raise ValueError(f"fastkd: vocab_size {k.vocab_size} must be in [1, min({student.shape[1]}, "
                         f"{teacher.shape[1]})]")
    if not 0 <= k.divergence_id < len(DIVERGENCES):
        raise ValueError("fastkd: unknown divergence id")
    if not (k.inv_temperature > 0.0 and math.isfinite(k.inv_temperature)):
        raise ValueError("fastkd: inv_temperature must be finite and > 0 (temperature > 0)")
    if not 0.0 <= k.beta <= 1.0:
        raise ValueError("fastkd: beta must be in [0, 1]")
    if grad_scale is None:
        return
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != student.shape[0] or labels.dtype != torch.int64
                               or not labels.is_contiguous() or labels.device != student.device):
        raise ValueError("fastkd: labels must be a contiguous int64 [N] tensor on the logits' device")
    if k.ce_weight != 0.0 and labels is None:
        raise ValueError("fastkd: ce_weight != 0 needs labels")
    if grad_scale.numel() != 1 or grad_scale.device != student.device:
        raise ValueError("fastkd: grad_scale must be a one-element tensor on the logits' device")
    if row_stats is not None and (tuple(row_stats.shape) != (student.shape[0], ROW_STATS_WIDTH)
                                  or row_stats.dtype != torch.float32 or not row_stats.is_contiguous()
                                  or row_stats.device != student.device):
        raise ValueError(f"fastkd: row_stats must be a contiguous float32 [N, {ROW_STATS_WIDTH}] tensor "
                         "on the logits' device")


def check_scale_grad_args(grad, factor) -> None:
    """The scale_grad_ operator's tensors: a 2-D gradient with unit stride along the
    vocabulary, and a factor of 1 or N elements on the gradient's device (a kernel would
    otherwise read the factor through a pointer of another device)."""
    if grad.dim() != 2 or grad.stride(1) != 1:
        raise ValueError("fastkd: grad must be 2-D with unit stride along the vocabulary")
    if factor.numel() not in (1, grad.shape[0]):
        raise ValueError(f"fastkd: grad_output must have 1 or {grad.shape[0]} elements, got {factor.numel()}")
    if factor.device != grad.device:
        raise ValueError(f"fastkd: grad_output must be on the gradient's device ({grad.device}), got {factor.device}")


# ---------------------------------------------------------------------------------------
# Fake (meta) implementations of the operators: shapes and dtypes only, shared by every
# backend's operators, so torch.compile(fullgraph=True) traces through them.

def loss_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    """Per-row losses are float32, or float64 when an input is float64."""
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


def fake_forward(student, teacher, labels, grad_scale, row_stats, ints, floats):
    loss = student.new_empty((student.shape[0],), dtype=loss_dtype(student, teacher))
    return loss, student.new_empty(student.shape)


def fake_forward_inplace(student, teacher, labels, grad_scale, row_stats, ints, floats):
    return student.new_empty((student.shape[0],), dtype=loss_dtype(student, teacher))


def fake_row_stats(student, teacher, ints, floats):
    return student.new_empty((student.shape[0], ROW_STATS_WIDTH), dtype=torch.float32)


def fake_scale_grad_(grad, factor):
    return None
