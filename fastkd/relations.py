"""Relation distillation: the student reproduces the teacher's relations between samples.

Inputs are sample embeddings ``student [B, D_s]`` and ``teacher [B, D_t]``; every loss
compares ``B x B`` (or ``B x B x B``) structures, so ``D_s`` and ``D_t`` may differ and no
projection is needed. docs/relations.md gives the formulas, sources and choices.

* :func:`rkd_distance_loss` -- RKD distance (Park et al., CVPR 2019, eq. 3-4);
* :func:`rkd_angle_loss` -- RKD angle (Park et al., eq. 5-6), in blocks of anchors;
* :func:`similarity_preserving_loss` -- SP-KD (Tung & Mori, ICCV 2019, eq. 1-4);
* :func:`pool_hidden_states` -- ``[B, S, H]`` hidden states to ``[B, H]`` embeddings;
* :class:`RelationDistillation` -- a weighted sum of the above as an ``nn.Module``.

Common rules: the teacher is a constant (a teacher that requires grad is refused, as in
``kd_loss``); bf16/fp16 inputs are computed in float32, float64 in float64, and the loss
has that dtype; degenerate batches (too few samples, coincident embeddings, zero vectors)
give finite values and finite gradients; NaN in an input propagates to the loss.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_float_tensor, check_teacher_is_constant
from ._rkd_angle import AngleLoss, tile_shape
from .config import check_int, check_number

KINDS = ("rkd_distance", "rkd_angle", "similarity")
REDUCTIONS = ("mean", "sum")
POOLINGS = ("mean",)


# ---------------------------------------------------------------------------------------
# Checks.

def _check_reduction(reduction) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _check_block_size(block_size) -> Optional[int]:
    block_size = check_int("block_size", block_size, allow_none=True)
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be None (automatic) or an int >= 1, got {block_size}")
    return block_size


def _check_embeddings(student, teacher) -> torch.dtype:
    """Two ``[B, D]`` floating tensors with the same B, on one device, the teacher a constant.

    Returns the dtype the loss is computed in: float64 if either side is float64, else float32.
    """
    for name, x in (("student", student), ("teacher", teacher)):
        check_float_tensor(name, x, "[B, D]")
        if x.dim() != 2:
            raise ValueError(
                f"{name} must have shape [B, D] (one embedding per sample), got shape {tuple(x.shape)}; "
                "pool [B, S, H] hidden states first (pool_hidden_states or RelationDistillation)")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher must have the same batch size B, got shapes {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}")
    if student.device != teacher.device:
        raise ValueError(f"student is on {student.device} but teacher is on {teacher.device}")
    check_teacher_is_constant("teacher", teacher)
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


def _zero_loss(student: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 for a degenerate batch, still part of the student's graph (``backward()`` gives zeros).

    The sum of an empty slice is exactly 0 whatever the values, so even a NaN cannot leak in.
    """
    return student[:0].to(dtype).sum()


# ---------------------------------------------------------------------------------------
# Shared quantities.

def _centred_gram(x: torch.Tensor) -> torch.Tensor:
    """``C Cᵀ`` with ``C = x - mean(x)``: distances and angles do not move under a shift, and
    centring removes the common component (large in LLM hidden states) that would otherwise
    cancel catastrophically in ``|c_i|^2 + |c_j|^2 - 2 <c_i, c_j>``."""
    c = x - x.mean(0, keepdim=True)
    return c @ c.T


def _pair_distances(x: torch.Tensor) -> torch.Tensor:
    """``|x_i - x_j|`` for the B(B-1)/2 pairs i < j (row-major order), from the centred Gram.

    A distance that rounds to 0 or below is 0 with gradient 0 (the norm's subgradient at 0),
    instead of sqrt's infinite derivative; NaN propagates.
    """
    batch = x.shape[0]
    gram = _centred_gram(x)
    diag = gram.diagonal()
    i, j = torch.triu_indices(batch, batch, 1, device=x.device)
    sq = diag[i] + diag[j] - 2 * gram[i, j]
    zero = sq <= 0
    return torch.where(zero, 0.0, torch.sqrt(torch.where(zero, 1.0, sq)))


def _mean_normalised(d: torch.Tensor) -> torch.Tensor:
    """``d / mean(d)``; all-zero distances (every embedding the same) stay 0."""
    mu = d.mean()
    return d / torch.where(mu <= 0, 1.0, mu)


def _row_normalised_gram(x: torch.Tensor) -> torch.Tensor:
    """``G = x xᵀ`` with each row divided by its L2 norm; a zero row stays 0."""
    gram = x @ x.T
    sq = (gram * gram).sum(1, keepdim=True)
    zero = sq <= 0
    return gram / torch.where(zero, 1.0, torch.sqrt(torch.where(zero, 1.0, sq)))


# ---------------------------------------------------------------------------------------
# The losses.

def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """RKD distance loss (Park et al., "Relational Knowledge Distillation", CVPR 2019, eq. 3-4).

    Over the P = B(B-1)/2 pairs i < j, with ``d_ij = |e_i - e_j|`` on each side and ``mu``
    its mean over those pairs::

        loss = sum_{i<j} huber(d^s_ij / mu^s - d^t_ij / mu^t)   (÷ P for reduction="mean")

    ``huber`` is Smooth-L1 with beta = 1 (``torch.nn.functional.smooth_l1_loss``). The
    teacher's distances and mean are constants. B < 2 gives 0; a side whose embeddings all
    coincide (mu = 0) has normalised distances 0, with a zero gradient.

    Args:
        student: ``[B, D_s]`` student embeddings.
        teacher: ``[B, D_t]`` teacher embeddings (no grad; D_t may differ from D_s).
        reduction: ``"mean"`` over the P pairs (default) or ``"sum"``.
    """
    reduction = _check_reduction(reduction)
    dtype = _check_embeddings(student, teacher)
    if student.shape[0] < 2:
        return _zero_loss(student, dtype)
    with torch.no_grad():
        target = _mean_normalised(_pair_distances(teacher.to(dtype)))
    return F.smooth_l1_loss(_mean_normalised(_pair_distances(student.to(dtype))), target,
                            reduction=reduction, beta=1.0)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor, *, reduction: str = "mean",
                   block_size: Optional[int] = None) -> torch.Tensor:
    """RKD angle loss (Park et al., "Relational Knowledge Distillation", CVPR 2019, eq. 5-6).

    For every triple (i, j, k) of distinct indices -- B(B-1)(B-2) ordered triples; the
    degenerate ones the paper's code also sums (constant 0 or 1 on both sides) are left
    out of the count::

        cos_ijk = < (e_i - e_j)/|e_i - e_j| , (e_k - e_j)/|e_k - e_j| >   (angle at e_j)
        loss = sum_{i,j,k distinct} huber(cos^s_ijk - cos^t_ijk)   (÷ B(B-1)(B-2) for "mean")

    Computed from each side's centred ``B x B`` Gram matrix in tiles of anchors j (and rows
    i), loss and gradient together: memory O(block_size * B^2) for a given ``block_size``;
    the default tiles have 2^18 elements on a CPU (cache-sized) and 2^24 elsewhere, about
    six of them alive at a time. Time O(B^3 + B^2 D); the whole ``B^3`` cube, or a
    ``[B, B, D]`` tensor of differences, never exists (docs/relations.md has measured
    times). Double backward is not supported. B < 3 gives 0; a pair of coincident embeddings (within fp rounding) has
    unit vector 0, so its angles are 0.

    Args:
        student: ``[B, D_s]`` student embeddings.
        teacher: ``[B, D_t]`` teacher embeddings (no grad).
        reduction: ``"mean"`` over the distinct triples (default) or ``"sum"``.
        block_size: anchors per block (None: automatic); any value gives the same result.
    """
    reduction = _check_reduction(reduction)
    block_size = _check_block_size(block_size)
    dtype = _check_embeddings(student, teacher)
    batch = student.shape[0]
    if batch < 3:
        return _zero_loss(student, dtype)
    with torch.no_grad():
        gram_t = _centred_gram(teacher.to(dtype))
    scale = 1.0 / (batch * (batch - 1) * (batch - 2)) if reduction == "mean" else 1.0
    block_j, block_i = tile_shape(batch, block_size, student.device.type)
    return AngleLoss.apply(_centred_gram(student.to(dtype)), gram_t, scale, block_j, block_i)


def similarity_preserving_loss(student: torch.Tensor, teacher: torch.Tensor, *,
                               reduction: str = "mean") -> torch.Tensor:
    """Similarity-preserving loss (Tung & Mori, "Similarity-Preserving Knowledge
    Distillation", ICCV 2019, eq. 1-4).

    ``G = E Eᵀ`` (``B x B``, raw embeddings, not centred), each row divided by its L2 norm::

        loss = |G~^s - G~^t|_F^2 / B^2      (reduction="mean", the paper's 1/b^2)
        loss = |G~^s - G~^t|_F^2            (reduction="sum")

    The teacher's Gram matrix is a constant. B < 2 gives 0; a zero embedding has a zero
    row in G~ (finite value, finite gradient).

    Args:
        student: ``[B, D_s]`` student embeddings.
        teacher: ``[B, D_t]`` teacher embeddings (no grad).
        reduction: ``"mean"`` (÷ B^2, default) or ``"sum"``.
    """
    reduction = _check_reduction(reduction)
    dtype = _check_embeddings(student, teacher)
    batch = student.shape[0]
    if batch < 2:
        return _zero_loss(student, dtype)
    with torch.no_grad():
        target = _row_normalised_gram(teacher.to(dtype))
    loss = (_row_normalised_gram(student.to(dtype)) - target).square().sum()
    return loss / (batch * batch) if reduction == "mean" else loss


LOSSES = {"rkd_distance": rkd_distance_loss, "rkd_angle": rkd_angle_loss, "similarity": similarity_preserving_loss}


# ---------------------------------------------------------------------------------------
# Hidden states to sample embeddings.

def _check_token_mask(name: str, mask, hidden: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name} must be an integer or bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"{name} must have shape {tuple(hidden.shape[:2])} ([B, S] of hidden "
                         f"{tuple(hidden.shape)}), got {tuple(mask.shape)}")
    if mask.device != hidden.device:
        raise ValueError(f"{name} is on {mask.device} but hidden is on {hidden.device}")


def pool_hidden_states(hidden: torch.Tensor, labels: Optional[torch.Tensor] = None,
                       attention_mask: Optional[torch.Tensor] = None, *, ignore_index: int = -100) -> torch.Tensor:
    """Mean of ``hidden [B, S, H]`` over each row's valid tokens: ``[B, H]`` sample embeddings.

    A token is valid where ``labels != ignore_index`` (the tokens the loss trains on) and
    ``attention_mask != 0`` (not padding); with neither given every token is. A row with no
    valid token gives zeros (no NaN), and invalid tokens are excluded by selection, so even
    a NaN there does not reach the mean. bf16/fp16 are summed in float32 and the result is
    float32 (float64 stays float64).
    """
    check_float_tensor("hidden", hidden, "[B, S, H]")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, S, H], got shape {tuple(hidden.shape)}")
    ignore_index = check_int("ignore_index", ignore_index)
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    valid = None
    if labels is not None:
        _check_token_mask("labels", labels, hidden)
        valid = labels != ignore_index
    if attention_mask is not None:
        _check_token_mask("attention_mask", attention_mask, hidden)
        keep = attention_mask != 0
        valid = keep if valid is None else valid & keep
    if valid is None:
        return hidden.sum(1, dtype=dtype) / max(1, hidden.shape[1])
    total = torch.where(valid[..., None], hidden, 0.0).sum(1, dtype=dtype)
    return total / valid.sum(1, keepdim=True).clamp_min(1).to(dtype)


# ---------------------------------------------------------------------------------------
# The module.

def _check_terms(kind) -> Tuple[Tuple[str, float], ...]:
    def check_kind(value, where):
        if not isinstance(value, str) or value not in KINDS:
            raise ValueError(f"{where} must be one of {KINDS}, got {value!r}")
        return value

    if isinstance(kind, str):
        return ((check_kind(kind, "kind"), 1.0),)
    if not isinstance(kind, (list, tuple)) or len(kind) == 0:
        raise TypeError(f"kind must be one of {KINDS} or a non-empty list of (kind, weight) pairs, "
                        f"got {kind!r}")
    terms = []
    for n, term in enumerate(kind):
        if not isinstance(term, (list, tuple)) or len(term) != 2:
            raise TypeError(f"kind[{n}] must be a (kind, weight) pair, got {term!r}")
        terms.append((check_kind(term[0], f"kind[{n}][0]"), check_number(f"kind[{n}][1] (weight)", term[1])))
    return tuple(terms)


class RelationDistillation(nn.Module):
    """A weighted sum of relation losses between student and teacher samples.

    Args:
        kind: ``"rkd_distance"``, ``"rkd_angle"`` or ``"similarity"`` (weight 1), or a list of
            ``(kind, weight)`` pairs, e.g. ``[("rkd_distance", 1.0), ("rkd_angle", 2.0)]``
            (Park et al. use 25 and 50 in metric learning).
        pooling: how ``[B, S, H]`` hidden states become ``[B, H]`` embeddings: ``"mean"`` over
            the valid tokens (:func:`pool_hidden_states`).
        block_size: anchors per block of the angle loss (None: automatic).

    ``forward(student, teacher, labels=None)`` takes ``[B, D]`` embeddings or ``[B, S, H]``
    hidden states for either side (a rank-3 side is pooled, with ``labels`` masking tokens
    equal to -100); losses use ``reduction="mean"``.
    """

    def __init__(self, kind: Union[str, Sequence[Tuple[str, float]]], *, pooling: str = "mean",
                 block_size: Optional[int] = None):
        super().__init__()
        self.terms = _check_terms(kind)
        if not isinstance(pooling, str) or pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.block_size = _check_block_size(block_size)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        ranks = [x.dim() if isinstance(x, torch.Tensor) else None for x in (student, teacher)]
        if labels is not None and 3 not in ranks:
            raise ValueError("labels mask the tokens of [B, S, H] hidden states, but neither student nor "
                             f"teacher has rank 3 (ranks {ranks[0]} and {ranks[1]}): [B, D] embeddings take "
                             "labels=None")
        # A rank-3 side is pooled; the losses check everything else.
        if ranks[0] == 3:
            student = pool_hidden_states(student, labels)
        if ranks[1] == 3:
            teacher = pool_hidden_states(teacher, labels)
        total = None
        for kind, weight in self.terms:
            extra = {"block_size": self.block_size} if kind == "rkd_angle" else {}
            term = weight * LOSSES[kind](student, teacher, **extra)
            total = term if total is None else total + term
        return total

    def extra_repr(self) -> str:
        terms = ", ".join(f"({k!r}, {w:g})" for k, w in self.terms)
        return f"kind=[{terms}], pooling={self.pooling!r}, block_size={self.block_size}"
