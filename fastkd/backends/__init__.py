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

Sparse (top-k / sampled) teachers have their own operators (``fastkd.sparse_kd_loss``;
the math per row, with its gradients, is in ``fastkd/sparse_reference.py`` and
docs/sparse.md, and written for kernel authors in the kernels' header comments)::

    sparse_kd_forward(student, ids, logprobs, labels?, grad_scale, int[] ints, Tensor floats)
        -> (loss [N], grad)
    sparse_kd_forward_inplace(student!, ...same...) -> loss [N]   # the gradient overwrites student

``student`` is [N, Vs] (unit stride along the vocabulary), ``ids`` [N, K] int32 or int64
and ``logprobs`` [N, K] float32/bfloat16/float16 (float64 where the backend takes it),
both contiguous; ``ints`` are :data:`fastkd.config.SPARSE_INT_SETTINGS` (the dense ints,
then ``tail_id``), ``floats`` as for ``kd_forward``. An id < 0 is an empty slot (its
log-prob is never read as a number); the Python layer has checked ids on the CPU, and a
kernel gives a row with an id >= vocab_size or an id twice a NaN loss and gradient. The
sparse operators have no ``row_stats`` argument (yet). ``scale_grad_`` is shared.

Several teachers (``teacher_logits`` a sequence of K; docs/multi_teacher.md) have their own
entry points, run today by the ``torch``, ``cpu`` and ``triton`` backends (``fastkd._dispatch``:
``MULTI_TEACHER_BACKENDS``; the kernel plan is in docs/multi_teacher.md)::

    multi_forward(student, teachers, weights, labels, grad_scale, cfg) -> (loss [N], grad)
    multi_forward_inplace(student!, ...same...) -> loss [N]

The compiled backends run them as the operators (``ints`` are
:data:`fastkd.config.MULTI_INT_SETTINGS`: the dense ints, then ``teacher_mode_id``)::

    kd_multi_forward(student, Tensor[] teachers, weights, labels?, grad_scale, int[] ints,
                     Tensor floats) -> (loss [N], grad)
    kd_multi_forward_inplace(student!, ...same...) -> loss [N]

(``torch.ops.fastkd.triton_kd_multi_forward[_inplace]`` for ``triton``) with at most
:data:`MAX_KERNEL_TEACHERS` teachers (more run on the ``torch`` backend).
``teachers`` is a tuple of K [N, V_k] tensors (unit stride along the vocabulary; dtypes and
widths may differ, each >= vocab_size), ``weights`` a [K, N] tensor in loss_dtype (constant
weights are a [K, 1] tensor expanded: stride 0 along N), ``cfg.teacher_mode`` ``mixture``
or ``sum``. A teacher whose weight is 0 in a row is not read in that row (NaN there must
not reach the loss); ignored rows get zero loss and gradient whatever their weights.

Per-token diagnostics (``return_stats=True``; docs/diagnostics.md) come from the same pass,
where a backend has them (``fastkd._dispatch.STATS_BACKENDS``)::

    forward_stats(student, teacher, labels, grad_scale, cfg) -> (loss [N], grad, stats)
    forward_stats_inplace(student!, ...same...) -> (loss [N], stats)
    sparse_forward_stats(student, ids, logprobs, labels, grad_scale, cfg) -> (loss [N], grad, stats)
    sparse_forward_stats_inplace(student!, ...same...) -> (loss [N], stats)

(the compiled operators ``kd_forward_stats``, ``kd_forward_stats_inplace``,
``sparse_kd_forward_stats``, ``sparse_kd_forward_stats_inplace``, the dense ones without the
``row_stats`` argument). ``stats`` is ``[N, STATS_WIDTH]`` in the loss dtype, per row:

    0  dense: H(p) = -sum p log p;  sparse: P = sum over the valid ids of p (teacher_mass)
    1  H(q) = -sum q log q over the first vocab_size columns (student_entropy)
    2  1.0 where argmax s' == argmax t' (first column among equal maxima on each side; sparse:
       the teacher's best id is the valid slot of highest log-prob, the first among ties, and
       a row without a valid id never agrees), else 0.0 (top1_agree)
    3  D(p, q), the divergence the loss weighs, unweighted (no div_weight, no CE term)
    4  dense: 0;  sparse: Q = sum over the valid ids of q (student_mass)

with p = softmax(t'/T), q = softmax(s'/T) of the transformed logits, as the loss. Ignored rows:
NaN in columns 0, 1, 3, 4 and 0.0 in column 2. ``fastkd.stats`` (``kd_stats``,
``sparse_kd_stats``) is the reference these are tested against.

Backends register with ``fastkd._dispatch`` on first use; nothing here imports Triton or
loads the C++ extension.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from ..config import DIVERGENCES, TAILS, TEACHER_MODES

# The most teachers one several-teachers kernel call reads (csrc/kd_params.h:
# kMaxKernelTeachers): their row statistics stay in registers.
MAX_KERNEL_TEACHERS = 4
STATS_WIDTH = 5  # the per-token diagnostics' columns (above)
ROW_STATS_WIDTH = 5  # (max_s, sumexp_s, max_t, sumexp_t, sumexp_raw); maxes in units of s/T
LOW_PRECISION_AND_FP32 = (torch.float32, torch.bfloat16, torch.float16)

# The per-shard phases of the vocab-parallel loss (fastkd/distributed): the same three
# phases, each on one rank's columns, with the row statistics and row sums combined
# across ranks between them. Their tensors are in loss_dtype (float32, float64 for float64
# input)::
#
#   shard_row_stats(student, teacher, int[] ints, Tensor floats) -> [N, SHARD_STATS_WIDTH]
#       the shard's (max_s, sumexp_s, max_t, sumexp_t, sumexp_raw) with its LOCAL maxima,
#       and the value term of forward/reverse KL over the shard, against those maxima:
#         forward_kl  sum_i exp(b_i - max_t) (b_i - a_i)     (a = s/T, b = t/T)
#         reverse_kl  sum_i exp(a_i - max_s) (a_i - b_i)
#         jsd, tvd    0
#       and, in column 6, the sum of the student's transformed logits s' over the shard's
#       counted columns when label_smoothing > 0 (0 otherwise)
#   shard_row_sums(student, teacher, row_stats, int[] ints, Tensor floats) -> [N, ROW_SUMS_WIDTH]
#       given the GLOBAL row statistics [N, ROW_STATS_WIDTH], the shard's part of the row
#       sums (additive across shards):
#         jsd  (sum q, sum q h, sum q, sum q h, sum p (log p - log m)): the first two over
#              the entries with q <= 1/2 + 2^-10, the next two over the others (peaked
#              rows); h = log q - log m
#         reverse_kl  the same with h = log q - log p, last column 0
#         tvd  (1/2 sum |q - p|, sum of q where q > p, where q < p, where q = p, 0)
#   shard_write_grad(student, teacher, labels?, grad_scale, row_stats, row_sums?, int vocab_start,
#                    int[] ints, Tensor floats) -> grad
#       the shard's gradient from the global statistics (and, for reverse_kl/jsd/tvd, the
#       global row sums); labels are global
#       ids, the one-hot of the CE term lands where label - vocab_start is a column of the
#       shard. Ignored rows get zeros.
#
# ``ints`` carries the SHARD's vocab_size: how many of its columns count (>= 1).
SHARD_STATS_WIDTH = 7
ROW_SUMS_WIDTH = 5


@dataclass(frozen=True)
class ShardPhases:
    """A backend's per-shard phases (the operators above), called with a KDConfig whose
    vocab_size is the shard's: ``row_stats(student, teacher, cfg)``,
    ``row_sums(student, teacher, stats, cfg)``, ``write_grad(student, teacher, labels,
    grad_scale, stats, sums, vocab_start, cfg)``."""

    row_stats: Callable
    row_sums: Callable
    write_grad: Callable


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
    # Sparse teachers: sparse_forward(student, ids, logprobs, labels, grad_scale, cfg) ->
    # (loss rows, grad), sparse_forward_inplace(...) -> loss rows, with a SparseKDConfig;
    # differentiable_sparse_loss(student, ids, logprobs, labels, cfg, num_items) as above.
    # None where the backend has no sparse kernels (dispatch then skips it for them).
    shard: Optional[ShardPhases] = None
    sparse_forward: Optional[Callable] = None
    sparse_forward_inplace: Optional[Callable] = None
    differentiable_sparse_loss: Optional[Callable] = None
    # Several teachers: multi_forward(student, teachers, weights, labels, grad_scale, cfg) ->
    # (loss rows, grad), multi_forward_inplace(...) -> loss rows; differentiable_multi_loss(
    # student, teachers, weights, labels, cfg, num_items) the reduced loss as an autograd graph.
    multi_forward: Optional[Callable] = None
    multi_forward_inplace: Optional[Callable] = None
    differentiable_multi_loss: Optional[Callable] = None
    # Per-token diagnostics from the same pass (the contract above); None where the backend
    # has none (``fastkd._dispatch.STATS_BACKENDS`` lists those that have them).
    forward_stats: Optional[Callable] = None
    forward_stats_inplace: Optional[Callable] = None
    sparse_forward_stats: Optional[Callable] = None
    sparse_forward_stats_inplace: Optional[Callable] = None

    def has(self, op: str) -> bool:
        """Whether the backend runs ``op``: ``dense`` (kd_loss) or ``sparse`` (sparse_kd_loss)."""
        return op == "dense" or self.sparse_forward is not None or self.differentiable_sparse_loss is not None


# ---------------------------------------------------------------------------------------
# The operator contract's entry check, for operators written in Python (Triton). The C++
# operators have its twin in csrc/ops.cpp; both guard the contract, the user's input was
# checked before (fastkd/_checks.py).

def _check_call_tensors(student, labels, grad_scale, k) -> None:
    """The labels and the reduction's scale of a forward operator (dense or sparse)."""
    n = student.shape[0]
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != n or labels.dtype != torch.int64
                               or not labels.is_contiguous() or labels.device != student.device):
        raise ValueError("fastkd: labels must be a contiguous int64 [N] tensor on the logits' device")
    if k.ce_weight != 0.0 and labels is None:
        raise ValueError("fastkd: ce_weight != 0 needs labels")
    if grad_scale.numel() != 1 or grad_scale.device != student.device:
        raise ValueError("fastkd: grad_scale must be a one-element tensor on the logits' device")


def _check_float_settings(k) -> None:
    if not (k.inv_temperature > 0.0 and math.isfinite(k.inv_temperature)):
        raise ValueError("fastkd: inv_temperature must be finite and > 0 (temperature > 0)")
    if not 0.0 <= k.beta <= 1.0:
        raise ValueError("fastkd: beta must be in [0, 1]")


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
    _check_float_settings(k)
    if grad_scale is None:
        return
    _check_call_tensors(student, labels, grad_scale, k)
    if row_stats is not None and (tuple(row_stats.shape) != (student.shape[0], ROW_STATS_WIDTH)
                                  or row_stats.dtype != torch.float32 or not row_stats.is_contiguous()
                                  or row_stats.device != student.device):
        raise ValueError(f"fastkd: row_stats must be a contiguous float32 [N, {ROW_STATS_WIDTH}] tensor "
                         "on the logits' device")


def check_multi_operator_args(student, teachers, weights, labels, grad_scale, k, dtypes) -> None:
    """The several-teachers operators' tensors and unpacked settings ``k``
    (:class:`fastkd.config.MultiKernelSettings`), for operators written in Python: each
    teacher as ``check_operator_args`` checks one, weights [K, N] in loss_dtype."""
    K = len(teachers)
    if not 1 <= K <= MAX_KERNEL_TEACHERS:
        raise ValueError(f"fastkd: the several-teachers kernels take 1 to {MAX_KERNEL_TEACHERS} teachers, got {K}")
    for teacher in teachers:
        check_operator_args(student, teacher, None, None, None, k, dtypes)
    if not 0 <= k.teacher_mode_id < len(TEACHER_MODES):
        raise ValueError("fastkd: unknown teacher mode id")
    dtype = loss_dtype(student, *teachers)
    if (weights.dim() != 2 or tuple(weights.shape) != (K, student.shape[0]) or weights.dtype != dtype
            or weights.device != student.device):
        raise ValueError(f"fastkd: weights must be a {dtype} [K, N] = [{K}, {student.shape[0]}] tensor on the "
                         f"logits' device (the loss dtype), got a {weights.dtype} {tuple(weights.shape)} tensor on "
                         f"{weights.device}")
    _check_call_tensors(student, labels, grad_scale, k)


def check_sparse_operator_args(student, ids, logprobs, labels, grad_scale, k, dtypes) -> None:
    """The sparse operators' tensors and unpacked settings ``k``
    (:class:`fastkd.config.SparseKernelSettings`), for sparse operators written in Python."""
    if student.dim() != 2 or student.stride(1) != 1:
        raise ValueError(f"fastkd: student must be 2-D [N, V] with unit stride along V, got {tuple(student.shape)}")
    n = student.shape[0]
    if ids.dim() != 2 or ids.shape[0] != n or tuple(logprobs.shape) != tuple(ids.shape):
        raise ValueError(f"fastkd: ids and logprobs must be [N, K] with N = {n}, got {tuple(ids.shape)} and "
                         f"{tuple(logprobs.shape)}")
    if ids.dtype not in (torch.int32, torch.int64) or not ids.is_contiguous() or not logprobs.is_contiguous():
        raise ValueError("fastkd: ids must be int32/int64 and ids, logprobs contiguous")
    if ids.device != student.device or logprobs.device != student.device:
        raise ValueError("fastkd: ids and logprobs must be on the student's device")
    if student.dtype not in dtypes or logprobs.dtype not in dtypes:
        raise TypeError(f"fastkd: this backend takes {', '.join(str(d).replace('torch.', '') for d in dtypes)} "
                        f"student logits and log-probs, got {student.dtype} and {logprobs.dtype}")
    if not 1 <= k.vocab_size <= student.shape[1]:
        raise ValueError(f"fastkd: vocab_size {k.vocab_size} must be in [1, {student.shape[1]}]")
    if not 0 <= k.divergence_id < len(DIVERGENCES) or not 0 <= k.tail_id < len(TAILS):
        raise ValueError("fastkd: unknown divergence or tail id")
    divergence = DIVERGENCES[k.divergence_id]
    if TAILS[k.tail_id] == "none" and not (divergence == "forward_kl" or (divergence == "jsd" and k.beta == 0.0)):
        raise ValueError("fastkd: tail 'none' is forward KL only")
    _check_float_settings(k)
    _check_call_tensors(student, labels, grad_scale, k)


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

def loss_dtype(student: torch.Tensor, *teachers: torch.Tensor) -> torch.dtype:
    """Per-row losses (and the shard phases' statistics) are float32, or float64 when an
    input is float64."""
    return torch.float64 if any(x.dtype == torch.float64 for x in (student,) + teachers) else torch.float32


def fake_forward(student, teacher, labels, grad_scale, row_stats, ints, floats):
    loss = student.new_empty((student.shape[0],), dtype=loss_dtype(student, teacher))
    return loss, student.new_empty(student.shape)


def fake_forward_inplace(student, teacher, labels, grad_scale, row_stats, ints, floats):
    return student.new_empty((student.shape[0],), dtype=loss_dtype(student, teacher))


def fake_sparse_forward(student, ids, logprobs, labels, grad_scale, ints, floats):
    loss = student.new_empty((student.shape[0],), dtype=loss_dtype(student, logprobs))
    return loss, student.new_empty(student.shape)


def fake_sparse_forward_inplace(student, ids, logprobs, labels, grad_scale, ints, floats):
    return student.new_empty((student.shape[0],), dtype=loss_dtype(student, logprobs))


def fake_multi_forward(student, teachers, weights, labels, grad_scale, ints, floats):
    return student.new_empty((student.shape[0],), dtype=weights.dtype), student.new_empty(student.shape)


def fake_multi_forward_inplace(student, teachers, weights, labels, grad_scale, ints, floats):
    return student.new_empty((student.shape[0],), dtype=weights.dtype)


def fake_forward_stats(student, teacher, labels, grad_scale, ints, floats):
    loss = student.new_empty((student.shape[0],), dtype=loss_dtype(student, teacher))
    return loss, student.new_empty(student.shape), student.new_empty((student.shape[0], STATS_WIDTH), dtype=loss.dtype)


def fake_forward_stats_inplace(student, teacher, labels, grad_scale, ints, floats):
    loss = student.new_empty((student.shape[0],), dtype=loss_dtype(student, teacher))
    return loss, student.new_empty((student.shape[0], STATS_WIDTH), dtype=loss.dtype)


def fake_sparse_forward_stats(student, ids, logprobs, labels, grad_scale, ints, floats):
    return fake_forward_stats(student, logprobs, labels, grad_scale, ints, floats)


def fake_sparse_forward_stats_inplace(student, ids, logprobs, labels, grad_scale, ints, floats):
    return fake_forward_stats_inplace(student, logprobs, labels, grad_scale, ints, floats)


def fake_row_stats(student, teacher, ints, floats):
    return student.new_empty((student.shape[0], ROW_STATS_WIDTH), dtype=torch.float32)


def fake_scale_grad_(grad, factor):
    return None


def fake_shard_row_stats(student, teacher, ints, floats):
    return student.new_empty((student.shape[0], SHARD_STATS_WIDTH), dtype=loss_dtype(student, teacher))


def fake_shard_row_sums(student, teacher, row_stats, ints, floats):
    return student.new_empty((student.shape[0], ROW_SUMS_WIDTH), dtype=loss_dtype(student, teacher))


def fake_shard_write_grad(student, teacher, labels, grad_scale, row_stats, row_sums, vocab_start, ints, floats):
    return student.new_empty(student.shape)
