"""Per-token distillation diagnostics: ``kd_stats`` and ``sparse_kd_stats`` (docs/diagnostics.md).

What people plot to see whether distillation is working, per token, under the same
settings as the loss (temperature, ``vocab_size``, the logit options, ``ignore_index``):

    teacher_entropy  H(p) = -sum p log p,  p = softmax(t' / T)   (nats)
    student_entropy  H(q) = -sum q log q,  q = softmax(s' / T)   (nats)
    top1_agree       argmax s' == argmax t' over the counted columns
    divergence       D(p, q): the divergence kd_loss weights (no alpha, no T^2, no CE term)

with s', t' each side's transformed logits (``fastkd.reference.transform_logits``). For a
sparse teacher (K ids with log-probs log p, used as given) the teacher's entropy is not
known; instead P = sum_S p (``teacher_mass``) and Q = sum_S q (``student_mass``), and
``top1_agree`` compares the student's argmax with the teacher's best id.

Ties: both argmaxes take the first (lowest) index among equal maxima (``torch.argmax``'s
documented rule; for a sparse teacher the first slot among equal log-probs), and the token
agrees when those two indices are equal.

Ignored tokens (labels == ignore_index): the float fields are NaN, ``top1_agree`` is False,
and ``valid`` is False. Average a field with ``x[s.valid].mean()`` (or ``nanmean``).

This is the plain-PyTorch first slice: no autograd (under ``torch.no_grad``), computed in
row chunks of ``chunk_size`` tokens in float32 (float64 when an input is float64), so no
float32 ``[tokens, vocab]`` temporary exists beyond one chunk. The fused kernels can give
the same numbers from their row statistics at negligible cost (docs/diagnostics.md).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._checks import as_teachers, check_kd_args, check_sparse_kd_args
from .config import SparseKDConfig, check_int, make_config, takes_settings
from .backends import STATS_WIDTH
from .reference import compute_dtype, divergence_per_row, transform_logits
from .sparse_reference import SparseRows, sparse_divergence_per_row

DEFAULT_CHUNK_SIZE = 1024


class KDStats(NamedTuple):
    """Per-token diagnostics of ``kd_stats``; every field has the student's leading shape."""

    teacher_entropy: torch.Tensor  # H(p) in nats, float32 (float64 for float64 input); NaN where ignored
    student_entropy: torch.Tensor  # H(q) in nats; NaN where ignored
    top1_agree: torch.Tensor       # bool: argmax s' == argmax t' (first index among ties); False where ignored
    divergence: torch.Tensor       # D(p, q), unweighted; NaN where ignored
    valid: torch.Tensor            # bool: the token counts (labels != ignore_index; all True without labels)


class SparseKDStats(NamedTuple):
    """Per-token diagnostics of ``sparse_kd_stats``; every field has the student's leading shape."""

    teacher_mass: torch.Tensor     # P = sum of the teacher's probabilities on its ids; NaN where ignored
    student_mass: torch.Tensor     # Q = sum of q = softmax(s'/T) on the teacher's ids; NaN where ignored
    student_entropy: torch.Tensor  # H(q) in nats over the vocabulary; NaN where ignored
    top1_agree: torch.Tensor       # bool: argmax s' == the teacher's best id; False where ignored or no id
    divergence: torch.Tensor       # D for the config's tail and divergence, unweighted; NaN where ignored
    valid: torch.Tensor            # bool: the token counts


def _entropy(log_x: torch.Tensor) -> torch.Tensor:
    """Row -sum x log x from log-probabilities, with 0 log 0 = 0."""
    x = log_x.exp()
    return -torch.where(x == 0, torch.zeros_like(log_x), x * log_x).sum(-1)


def _check_chunk_size(chunk_size) -> int:
    chunk_size = check_int("chunk_size", chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (tokens per chunk), got {chunk_size}")
    return chunk_size


def _valid_rows(labels, n: int, cfg, device) -> torch.Tensor:
    if labels is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return labels.reshape(-1) != cfg.ignore_index


# ---------------------------------------------------------------------------------------
# The per-row table [N, STATS_WIDTH] (fastkd/backends/__init__.py: the columns), which the
# fused kernels write with return_stats=True and these functions compute in plain PyTorch:
# the reference of the kernels' stats and the torch backend's.

def _table(columns, valid: torch.Tensor) -> torch.Tensor:
    """Rows of ``columns`` (STATS_WIDTH [n] tensors), NaN at invalid rows except the agreement (0)."""
    table = torch.stack(columns, dim=-1)
    blank = torch.full_like(table, float("nan"))
    blank[:, 2] = 0.0
    return torch.where(valid[:, None], table, blank)


def stats_rows(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor], cfg,
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """The stats table of 2-D rows (``cfg.vocab_size`` fixed; ``labels`` [N] or None), in
    float32 (float64 for float64 input), chunk by chunk, without autograd."""
    V, n = cfg.vocab_size, student.shape[0]
    dtype = compute_dtype(student, teacher)
    valid = _valid_rows(labels, n, cfg, student.device)
    parts = []
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            stop = start + chunk_size
            s = transform_logits(student.detach()[start:stop, :V].to(dtype), cfg.logit_scale, cfg.softcap)
            t = transform_logits(teacher.detach()[start:stop, :V].to(dtype), cfg.teacher_scale, cfg.teacher_cap)
            log_q = F.log_softmax(s / cfg.temperature, dim=-1)
            log_p = F.log_softmax(t / cfg.temperature, dim=-1)
            agree = (s.argmax(-1) == t.argmax(-1)).to(dtype)
            parts.append(_table([_entropy(log_p), _entropy(log_q), agree,
                                 divergence_per_row(log_p, log_q, cfg.divergence, cfg.beta),
                                 torch.zeros_like(agree)], valid[start:stop]))
    return torch.cat(parts) if parts else torch.zeros((0, STATS_WIDTH), dtype=dtype, device=student.device)


def sparse_stats_rows(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                      labels: Optional[torch.Tensor], cfg, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """The stats table of a sparse teacher's 2-D rows (ids, logprobs [N, K])."""
    n = student.shape[0]
    dtype = compute_dtype(student, logprobs)
    valid = _valid_rows(labels, n, cfg, student.device)
    parts = []
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            stop = start + chunk_size
            rows = SparseRows(student.detach()[start:stop, :cfg.vocab_size], ids[start:stop],
                              logprobs.detach()[start:stop], cfg)
            log_q_all = rows.a - rows.lse.unsqueeze(-1)
            best_slot = rows.log_p.argmax(-1, keepdim=True)  # empty slots hold -inf
            best_id = rows.safe_ids.gather(-1, best_slot).squeeze(-1)
            agree = (rows.valid.any(-1) & (rows.s.argmax(-1) == best_id)).to(dtype)
            parts.append(_table([rows.log_mass_p.exp().to(dtype), _entropy(log_q_all).to(dtype), agree,
                                 sparse_divergence_per_row(rows, cfg).to(dtype),
                                 rows.log_q.exp().sum(-1).to(dtype)],  # exp(-inf) = 0 at empty slots
                                valid[start:stop]))
    return torch.cat(parts) if parts else torch.zeros((0, STATS_WIDTH), dtype=dtype, device=student.device)


def kd_stats_of(table: torch.Tensor, valid: torch.Tensor, lead) -> KDStats:
    """The :class:`KDStats` of a stats table (``valid`` [N] bool, ``lead`` the token shape)."""
    return KDStats(teacher_entropy=table[:, 0].reshape(lead), student_entropy=table[:, 1].reshape(lead),
                   top1_agree=(table[:, 2] > 0.5).reshape(lead), divergence=table[:, 3].reshape(lead),
                   valid=valid.reshape(lead))


def sparse_kd_stats_of(table: torch.Tensor, valid: torch.Tensor, lead) -> SparseKDStats:
    """The :class:`SparseKDStats` of a sparse stats table."""
    return SparseKDStats(teacher_mass=table[:, 0].reshape(lead), student_mass=table[:, 4].reshape(lead),
                         student_entropy=table[:, 1].reshape(lead), top1_agree=(table[:, 2] > 0.5).reshape(lead),
                         divergence=table[:, 3].reshape(lead), valid=valid.reshape(lead))


def stats_result(table: torch.Tensor, labels: Optional[torch.Tensor], cfg, lead, sparse: bool = False):
    """The :class:`KDStats` (``sparse``: :class:`SparseKDStats`) of a stats table whose rows are
    the tokens of shape ``lead`` (``labels`` as the loss took them, or None)."""
    valid = _valid_rows(labels, table.shape[0], cfg, table.device)
    return (sparse_kd_stats_of if sparse else kd_stats_of)(table, valid, lead)


@takes_settings(after=("chunk_size",))
def kd_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **settings,
) -> KDStats:
    """Per-token diagnostics of distilling ``teacher_logits`` into ``student_logits``: a :class:`KDStats`.

    The settings are ``kd_loss``'s and mean the same (those that only weigh or reduce the
    loss, such as ``alpha`` and ``reduction``, change nothing here). One teacher only.
    ``kd_loss(..., return_stats=True)`` gives the same numbers from the loss's own pass.

    Args:
        {settings}
        chunk_size: tokens per chunk; the float32 temporaries are ``[chunk_size, vocab_size]``.
    """
    cfg = make_config("kd_stats", **settings)
    chunk_size = _check_chunk_size(chunk_size)
    teachers = as_teachers(student_logits, teacher_logits, None)
    if len(teachers.logits) != 1:
        raise ValueError(f"kd_stats takes one teacher, got {len(teachers.logits)} (a sequence or a stacked "
                         f"[K, ..., V] tensor); call it once per teacher")
    cfg, _ = check_kd_args(student_logits, teachers.logits[0], labels, cfg)
    lead, V = student_logits.shape[:-1], student_logits.shape[-1]
    flat_labels = None if labels is None else labels.reshape(-1)
    table = stats_rows(student_logits.reshape(-1, V), teachers.logits[0].reshape(-1, teachers.logits[0].shape[-1]),
                       flat_labels, cfg, chunk_size)
    return stats_result(table, labels, cfg, lead)


@takes_settings(after=("chunk_size",), config=SparseKDConfig)
def sparse_kd_stats(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **settings,
) -> SparseKDStats:
    """Per-token diagnostics against a sparse teacher (K ids per token): a :class:`SparseKDStats`.

    The settings are ``sparse_kd_loss``'s and mean the same; ``divergence`` is the D of
    ``tail`` (fastkd/sparse_reference.py). The teacher's best id is the valid slot of
    highest log-prob (the first such slot among ties); a token without a valid id never agrees.
    ``sparse_kd_loss(..., return_stats=True)`` gives the same numbers from the loss's own pass.

    Args:
        {settings}
        chunk_size: tokens per chunk; the float32 temporaries are ``[chunk_size, vocab_size]``.
    """
    cfg = make_config("sparse_kd_stats", config=SparseKDConfig, **settings)
    chunk_size = _check_chunk_size(chunk_size)
    cfg, _ = check_sparse_kd_args(student_logits, teacher_ids, teacher_logprobs, labels, cfg)
    lead, K = student_logits.shape[:-1], teacher_ids.shape[-1]
    flat_labels = None if labels is None else labels.reshape(-1)
    table = sparse_stats_rows(student_logits.reshape(-1, student_logits.shape[-1]), teacher_ids.reshape(-1, K),
                              teacher_logprobs.reshape(-1, K), flat_labels, cfg, chunk_size)
    return stats_result(table, labels, cfg, lead, sparse=True)
