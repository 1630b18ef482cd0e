"""The ground truth: every fastkd loss in plain, vectorised PyTorch.

Slow and memory-hungry on purpose (it materialises several ``[tokens, vocab]`` tensors),
but exact: run it in float64 and every backend is compared against it. Autograd supplies
its gradient, so it is also the ``backend="torch"`` fallback.

Per token, each side's logits first pass through its logit transforms (``logit_scale`` m,
``softcap`` c; the teacher's may differ): x' = c tanh(m x / c), or m x without a cap.
With q = softmax(s' / T) and p = softmax(t' / T):

    forward_kl  KL(p||q) = sum p (log p - log q)
    reverse_kl  KL(q||p) = sum q (log q - log p)
    jsd         beta KL(p||m) + (1 - beta) KL(q||m),  m = beta p + (1 - beta) q
    tvd         1/2 sum |p - q|

    loss = alpha * T^2 * D(p, q) + (1 - alpha) * CE_eps(softmax(s'), label) + lambda lse(s')^2

CE_eps is PyTorch's label-smoothed cross-entropy (target (1 - eps) onehot + eps / V), and
lambda lse(s')^2 the z-loss (``z_loss``), on every counted token with or without labels.

Several teachers p_1..p_K (each through the teacher's transforms and T) with weights w_k
per token replace D(p, q) by (``teacher_mode``; docs/multi_teacher.md)

    mixture     D(m, q),  m = sum_k w_k p_k   (log m a log-sum-exp of log w_k + log p_k)
    sum         sum_k w_k D(p_k, q)

A teacher whose weight is 0 in a row takes no part in that row, whatever its logits hold
there (NaN, all -inf): its row is replaced before anything is computed from it.

Zero-probability entries contribute 0 (0 log 0 = 0), so -inf logits are legal. The
``torch.where`` guards are applied *before* the multiplication so that their backward
never meets ``0 * inf``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import as_teachers, check_kd_args, check_multi_kd_args
from .config import KDConfig, is_concrete, make_config, takes_settings


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (shared by the references and kd_stats)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(a||b) from log-probabilities, with 0 log 0 = 0."""
    a = log_a.exp()
    # "a == 0", not "a > 0": a NaN probability must reach the sum (and the gradient).
    diff = torch.where(a == 0, torch.zeros_like(log_a), log_a - log_b)
    return (a * diff).sum(-1)


def _jsd(log_p, log_q, beta, log_beta, log_one_minus_beta) -> torch.Tensor:
    """Row-wise beta KL(p||m) + (1 - beta) KL(q||m), m = beta p + (1 - beta) q."""
    # log m as a log-sum-exp; entries where both sides are -inf are excluded first
    # (logaddexp's backward is NaN there, and they contribute nothing anyway).
    both_zero = torch.isneginf(log_p) & torch.isneginf(log_q)
    lp = torch.where(both_zero, torch.zeros_like(log_p), log_p)
    lq = torch.where(both_zero, torch.zeros_like(log_q), log_q)
    log_m = torch.logaddexp(lp + log_beta, lq + log_one_minus_beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def divergence_per_row(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """D(p, q) for each row of teacher (log_p) and student (log_q) log-probabilities."""
    if divergence == "forward_kl":
        return _kl(log_p, log_q)
    if divergence == "reverse_kl":
        return _kl(log_q, log_p)
    if divergence == "jsd" and not is_concrete(beta):
        # A traced beta (a schedule under torch.compile): no Python branch on its value and
        # no math.log of it; beta 0 / 1 select forward / reverse KL, as the kernels do.
        beta_t = torch.ones((), dtype=torch.float64, device=log_p.device) * beta  # double, as math.log
        special = (beta_t == 0) | (beta_t == 1)
        safe = torch.where(special, torch.full_like(beta_t, 0.5), beta_t)  # no log(0) in the unused branch
        jsd = _jsd(log_p, log_q, safe, torch.log(safe), torch.log1p(-safe))
        return torch.where(beta_t == 0, _kl(log_p, log_q), torch.where(beta_t == 1, _kl(log_q, log_p), jsd))
    if divergence == "jsd":
        return _jsd(log_p, log_q, beta, math.log(beta), math.log1p(-beta))
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")


def transform_logits(x: torch.Tensor, scale, cap) -> torch.Tensor:
    """One side's logit transforms: cap tanh(scale x / cap), or scale x where cap is None."""
    if not (is_concrete(scale) and scale == 1.0):
        x = x * scale
    if cap is not None:
        x = cap * torch.tanh(x / cap)
    return x


def student_logits_of(student: torch.Tensor, labels: Optional[torch.Tensor], cfg: KDConfig) -> torch.Tensor:
    """The student's transformed logits s' (``student`` already in the compute dtype), cut
    off the graph at ignored rows."""
    s = student
    if labels is not None:
        # An ignored row takes no part in the graph: masking its loss afterwards is not
        # enough, since an infinite divergence there (reverse KL against a teacher's -inf)
        # sends 0 * inf = NaN back through the mask.
        s = torch.where((labels != cfg.ignore_index).unsqueeze(-1), s, s.detach())
    return transform_logits(s, cfg.logit_scale, cfg.softcap)


def loss_per_row(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    cfg: KDConfig,
) -> torch.Tensor:
    """Per-token loss, shape [N], for 2-D logits already cut to ``cfg.vocab_size``."""
    dtype = compute_dtype(student, teacher)
    s = student_logits_of(student.to(dtype), labels, cfg)
    t = transform_logits(teacher.detach().to(dtype), cfg.teacher_scale, cfg.teacher_cap)
    log_q = F.log_softmax(s / cfg.temperature, dim=-1)
    log_p = F.log_softmax(t / cfg.temperature, dim=-1)
    return add_hard_label_term(cfg.div_weight * divergence_per_row(log_p, log_q, cfg.divergence, cfg.beta),
                               s, labels, cfg)


def multi_loss_per_row(
    student: torch.Tensor,
    teachers,
    weights: torch.Tensor,
    labels: Optional[torch.Tensor],
    cfg: KDConfig,
) -> torch.Tensor:
    """Per-token loss [N] against K teachers (2-D, cut to ``cfg.vocab_size``; their dtypes
    may differ), ``weights`` [K, N]: the mixture's or the weighted sum's divergence."""
    dtype = compute_dtype(student, *teachers)
    s = student_logits_of(student.to(dtype), labels, cfg)
    log_q = F.log_softmax(s / cfg.temperature, dim=-1)
    w = weights.to(dtype)
    # "== 0", not "<= 0": a NaN (or, unchecked on a GPU, negative) weight must show in the loss.
    unused = w == 0
    log_ps = [_teacher_log_probs(t, unused[k], cfg, dtype) for k, t in enumerate(teachers)]
    if cfg.teacher_mode == "mixture":
        div = divergence_per_row(mixture_log_probs(log_ps, w), log_q, cfg.divergence, cfg.beta)
    else:
        zero = torch.zeros((), dtype=dtype, device=s.device)
        div = sum(torch.where(unused[k], zero, w[k] * divergence_per_row(log_p, log_q, cfg.divergence, cfg.beta))
                  for k, log_p in enumerate(log_ps))
    return add_hard_label_term(cfg.div_weight * div, s, labels, cfg)


def _teacher_log_probs(teacher: torch.Tensor, unused: torch.Tensor, cfg: KDConfig, dtype) -> torch.Tensor:
    """log softmax(t'/T) of one teacher, its unused rows (weight 0) made uniform first: the
    sum mode masks their divergence afterwards, and a NaN there would come back through
    the mask's backward as 0 * NaN; the mixture adds log 0 = -inf to a finite row."""
    t = teacher.detach().to(dtype)
    t = torch.where(unused.unsqueeze(-1), torch.zeros_like(t), t)
    return F.log_softmax(transform_logits(t, cfg.teacher_scale, cfg.teacher_cap) / cfg.temperature, dim=-1)


def mixture_log_probs(log_ps, w: torch.Tensor) -> torch.Tensor:
    """log sum_k w_k p_k as a log-sum-exp of log w_k + log p_k over the teachers (never the
    log of a sum of probabilities, which is -inf wherever every p_k underflows). A teacher
    of weight 0 is a -inf term (its row was made finite first: _teacher_log_probs)."""
    return torch.logsumexp(torch.stack([log_p + torch.log(w[k]).unsqueeze(-1) for k, log_p in enumerate(log_ps)]),
                           dim=0)


def add_hard_label_term(loss: torch.Tensor, s: torch.Tensor, labels: Optional[torch.Tensor],
                        cfg: KDConfig) -> torch.Tensor:
    """``loss`` (the weighted divergence per row) plus the terms at T = 1 on the student's
    transformed logits ``s``: ``ce_weight`` times the label-smoothed CE, and the z-loss;
    zero at ignored rows. Shared by the dense and sparse references."""
    if not _is_zero(cfg.z_loss):
        loss = loss + _times(cfg.z_loss, torch.logsumexp(s, dim=-1).square())
    if labels is not None:
        valid = labels != cfg.ignore_index
        if cfg.ce_weight != 0.0:
            safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
            ce = F.cross_entropy(s, safe, reduction="none")
            if not _is_zero(cfg.label_smoothing):
                # PyTorch's label_smoothing, written out: a traced epsilon (a schedule under
                # torch.compile) passed to F.cross_entropy is specialised, one graph per value.
                mean_neg_log_q = torch.logsumexp(s, dim=-1) - s.mean(-1)
                ce = ce + _times(cfg.label_smoothing, mean_neg_log_q - ce)
            loss = loss + cfg.ce_weight * ce
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss


def _is_zero(value) -> bool:
    """A setting that is concretely 0 (a traced value may be anything)."""
    return is_concrete(value) and value == 0.0


def _times(weight, x: torch.Tensor) -> torch.Tensor:
    """weight * x, 0 where weight is 0 (a traced 0 must not turn an infinite x into NaN)."""
    if is_concrete(weight):
        return weight * x
    w = torch.ones((), dtype=x.dtype, device=x.device) * weight
    return torch.where(w == 0, torch.zeros_like(x), w * x)


def reduce_loss(rows: torch.Tensor, labels, cfg: KDConfig, num_items) -> torch.Tensor:
    if cfg.reduction == "none":
        return rows
    total = rows.sum()
    if cfg.reduction == "sum":
        return total
    if cfg.reduction == "batchmean":
        return total / torch.sym_max(rows.numel(), 1)
    if num_items is not None:
        return total / num_items
    if labels is None:
        return total / torch.sym_max(rows.numel(), 1)
    return total / (labels != cfg.ignore_index).sum().clamp_min(1)


@takes_settings(after=("num_items",))
def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    teacher_weights=None,
    num_items=None,
    **settings,
) -> torch.Tensor:
    """Reference knowledge-distillation loss; same settings and meaning as ``fastkd.kd_loss``.

    Computes in float64 when either input is float64, otherwise in float32 (plain
    autograd: exact only in float64). The teacher is detached (a teacher that requires
    grad is rejected, as in ``fastkd.kd_loss``).

    Args:
        teacher_logits, teacher_weights: one teacher, or several with their weights, as in
            ``fastkd.kd_loss``.
        {settings}
        num_items: the denominator of ``reduction="mean"``, as in ``fastkd.kd_loss``.
    """
    cfg = make_config("kd_loss", **settings)
    teachers = as_teachers(student_logits, teacher_logits, teacher_weights)
    if teachers.single is None:
        cfg, weights, num_items = check_multi_kd_args(student_logits, teachers, labels, cfg, num_items)
        return multi_kd_loss_with_config(student_logits, teachers.logits, weights, labels, cfg, num_items)
    cfg, num_items = check_kd_args(student_logits, teachers.single, labels, cfg, num_items)
    return kd_loss_with_config(student_logits, teachers.single, labels, cfg, num_items)


def kd_loss_with_config(student_logits, teacher_logits, labels, cfg: KDConfig, num_items) -> torch.Tensor:
    """:func:`kd_loss` on checked input (``cfg.vocab_size`` fixed); the ``torch`` backend."""
    lead = student_logits.shape[:-1]
    s = student_logits[..., : cfg.vocab_size].reshape(-1, cfg.vocab_size)
    t = teacher_logits[..., : cfg.vocab_size].reshape(-1, cfg.vocab_size)
    flat_labels = None if labels is None else labels.reshape(-1)
    rows = loss_per_row(s, t, flat_labels, cfg)
    out = reduce_loss(rows, flat_labels, cfg, num_items)
    return out.reshape(lead) if cfg.reduction == "none" else out


def multi_kd_loss_with_config(student_logits, teachers, weights, labels, cfg: KDConfig, num_items) -> torch.Tensor:
    """:func:`kd_loss` with several teachers on checked input (``weights`` [K, N]); the
    ``torch`` backend's."""
    lead = student_logits.shape[:-1]
    V = cfg.vocab_size
    s = student_logits[..., :V].reshape(-1, V)
    ts = tuple(t[..., :V].reshape(-1, V) for t in teachers)
    flat_labels = None if labels is None else labels.reshape(-1)
    rows = multi_loss_per_row(s, ts, weights, flat_labels, cfg)
    out = reduce_loss(rows, flat_labels, cfg, num_items)
    return out.reshape(lead) if cfg.reduction == "none" else out
