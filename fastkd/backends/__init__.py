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

    kd_forward(student, teacher, labels?, grad_scale, row_stats?, int[] ints, float[] floats)
        -> (loss [N], grad)
    kd_forward_inplace(student!, ...same...) -> loss [N]    # the gradient overwrites student
    row_stats(student, teacher, int[] ints, float[] floats) -> [N, ROW_STATS_WIDTH] float32
    scale_grad_(grad!, factor)                             # grad *= factor, skipped when 1

``ints``/``floats`` are :meth:`fastkd.config.KDConfig.kernel_settings`: the whole loss
description, in the order ``csrc/kd_params.h`` unpacks. ``loss`` is the per-row loss
before reduction (0 at ignored rows; float32, float64 for float64 input); ``grad`` is
d(sum_rows loss * grad_scale)/d student in the student's dtype. Folding the reduction's
scale into the kernel means backward only multiplies by ``grad_output``, and the kernels
skip even that when it is 1, without a host sync.

Backends register with ``fastkd._dispatch`` on first use; nothing here imports Triton or
loads the C++ extension.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

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
