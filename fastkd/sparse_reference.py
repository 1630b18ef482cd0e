"""The ground truth of the sparse-teacher loss (``fastkd.sparse_kd_loss``), in plain PyTorch.

Per token the teacher gives K ids (its support S; an id < 0 is an empty slot, whatever
log-prob it holds is ignored) and their log-probabilities log p_j, used as given: they
describe the teacher at the distillation temperature. The student side is
q = softmax(s / T) over the whole (``vocab_size``-cut) vocabulary. P = sum_S p, Q = sum_S q.

    tail="bucket"  K + 1 bins: the K ids, and one tail bin holding 1 - P (teacher) and
                   1 - Q (student); D is the dense divergence on those bins. It equals the
                   full-vocabulary divergence between q and the implicit teacher
                   p~_j = p_j on S, p~_i = q_i (1 - P) / (1 - Q) off S (a constant), in value
                   and gradient (:func:`implicit_teacher_logprobs`).
    tail="renorm"  both sides renormalised over S: p^ = p / P, q^ = q / Q, D(p^, q^) on
                   the K bins; no full-vocabulary term (except the CE term's softmax).
    tail="none"    sum_S p (log p - log q), forward KL only (biased; negative only for
                   inconsistent input, and never clamped).

    loss = alpha * T^2 * D + (1 - alpha) * CE_eps(softmax(s'), label) + lambda lse(s')^2   (as kd_loss)

The student's logits pass through its transforms (``logit_scale``, ``softcap``) first, s
standing for s' above; the teacher's log-probabilities are used as given (its transforms
cannot apply to them, and ``make_config`` refuses setting them).

Conventions pinned here (docs/sparse.md):
* 1 - P = -expm1(logsumexp_S(log p)), exact as P -> 1 (never 1 - sum p). A P above 1
  (rounding of stored log-probs) leaves the teacher's tail bin empty: 1 - P is taken as
  max(1 - P, 0); the K bins are not rescaled, and the value is not clamped.
* 1 - Q = exp(lse_off - lse), lse_off the log-sum-exp of s/T over the ids *not* in S
  (computed from the complement, never as 1 - Q).
* When S covers the whole vocabulary the tail bin is empty on both sides (0 log 0 = 0),
  whatever rounding left in 1 - P.
* renorm with an empty support (no valid id, or P = 0) contributes 0.
* Entries with zero probability contribute 0 (0 log 0 = 0): -inf log-probs are legal.

Runs in float64 when the student or the log-probs are float64 (float32 otherwise), with
autograd's gradient; it is also the ``torch`` backend of the sparse loss.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_sparse_kd_args
from .config import KDConfig, SparseKDConfig, make_config, takes_settings
from .reference import add_hard_label_term, compute_dtype, divergence_per_row, reduce_loss, transform_logits

NEG_INF = float("-inf")


def _logsumexp(x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp, -inf where ``dead`` (rows with nothing but -inf), without the NaN
    that logsumexp's backward gives on such rows."""
    safe = torch.where(dead.unsqueeze(-1), torch.zeros_like(x), x)
    out = torch.logsumexp(safe, dim=-1)
    return torch.where(dead, torch.full_like(out, NEG_INF), out)


class SparseRows:
    """The per-row quantities of a sparse teacher against 2-D student logits (cut to V).

    s the student's transformed logits (logit_scale, softcap), a = s / T, lse = logsumexp(a); for the K slots: valid (id >= 0), the teacher's log p
    (-inf at empty slots) and the student's log q; the support's membership mask [N, V].
    """

    def __init__(self, student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, cfg: KDConfig):
        dtype = compute_dtype(student, logprobs)
        self.s = transform_logits(student.to(dtype), cfg.logit_scale, cfg.softcap)  # s' 
        self.a = self.s / cfg.temperature
        self.valid = ids >= 0
        self.safe_ids = torch.where(self.valid, ids, torch.zeros_like(ids)).long()
        neg = torch.full(ids.shape, NEG_INF, dtype=dtype, device=student.device)
        self.log_p = torch.where(self.valid, logprobs.detach().to(dtype), neg)
        self.lse = torch.logsumexp(self.a, dim=-1)
        self.a_support = self.a.gather(-1, self.safe_ids)
        self.log_q = torch.where(self.valid, self.a_support - self.lse.unsqueeze(-1), neg)
        # Membership by counting (a scatter of booleans would let an empty slot's index 0
        # overwrite a valid id 0).
        count = torch.zeros(self.a.shape, dtype=torch.int32, device=student.device)
        self.member = count.scatter_add_(-1, self.safe_ids, self.valid.int()) > 0
        self.complement_empty = ~(~self.member).any(-1)
        dead_p = ~torch.isfinite(self.log_p).any(-1) & ~torch.isnan(self.log_p).any(-1)
        # log P, -inf for an empty (or all -inf) support.
        self.log_mass_p = _logsumexp(self.log_p, dead_p)

    def tail_logs(self):
        """(log(1 - P), log(1 - Q)) per row: the tail bin of each side, -inf when empty."""
        one_minus_p = -torch.expm1(self.log_mass_p)           # exact as P -> 1
        log_tail_p = torch.log(one_minus_p.clamp_min(0.0))     # P > 1 (rounding): empty tail
        a_off = torch.where(self.member, torch.full_like(self.a, NEG_INF), self.a)
        off_dead = torch.isneginf(a_off).all(-1)               # includes an empty complement
        log_tail_q = _logsumexp(a_off, off_dead) - self.lse    # log(1 - Q) from the complement
        empty = torch.full_like(log_tail_p, NEG_INF)
        log_tail_p = torch.where(self.complement_empty, empty, log_tail_p)
        log_tail_q = torch.where(self.complement_empty, empty, log_tail_q)
        return log_tail_p, log_tail_q


def sparse_divergence_per_row(rows: SparseRows, cfg: SparseKDConfig) -> torch.Tensor:
    """D per row for ``cfg.tail`` and ``cfg.divergence`` (before ``div_weight``)."""
    if cfg.tail == "bucket":
        log_tail_p, log_tail_q = rows.tail_logs()
        log_pi = torch.cat([rows.log_p, log_tail_p.unsqueeze(-1)], dim=-1)
        log_kappa = torch.cat([rows.log_q, log_tail_q.unsqueeze(-1)], dim=-1)
        return divergence_per_row(log_pi, log_kappa, cfg.divergence, cfg.beta)
    if cfg.tail == "renorm":
        empty = torch.isneginf(rows.log_mass_p)
        log_pi = rows.log_p - torch.where(empty, torch.zeros_like(rows.log_mass_p), rows.log_mass_p).unsqueeze(-1)
        a_s = torch.where(rows.valid, rows.a_support, torch.full_like(rows.a_support, NEG_INF))
        log_kappa = a_s - _logsumexp(a_s, empty).unsqueeze(-1)
        log_kappa = torch.where(empty.unsqueeze(-1), torch.full_like(log_kappa, NEG_INF), log_kappa)
        d = divergence_per_row(log_pi, log_kappa, cfg.divergence, cfg.beta)
        return torch.where(empty, torch.zeros_like(d), d)
    if cfg.tail == "none":
        if cfg.divergence != "forward_kl":
            raise ValueError(f"tail='none' is forward KL only, got divergence={cfg.divergence!r}")
        return divergence_per_row(rows.log_p, rows.log_q, "forward_kl", cfg.beta)
    raise ValueError(f"unknown tail {cfg.tail!r}")


def sparse_loss_per_row(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                        labels: Optional[torch.Tensor], cfg: SparseKDConfig) -> torch.Tensor:
    """Per-token loss [N] for 2-D student logits cut to ``cfg.vocab_size`` and [N, K] ids/log-probs."""
    if labels is not None:
        # Ignored tokens take no part in the graph: an infinite D there (reverse KL against
        # an empty teacher tail) would otherwise send 0 * inf = NaN back through the mask.
        student = torch.where((labels != cfg.ignore_index).unsqueeze(-1), student, student.detach())
    rows = SparseRows(student, ids, logprobs, cfg)
    return add_hard_label_term(cfg.div_weight * sparse_divergence_per_row(rows, cfg), rows.s, labels, cfg)


def implicit_teacher_logprobs(student_logits: torch.Tensor, teacher_ids: torch.Tensor,
                              teacher_logprobs: torch.Tensor, temperature: float = 1.0,
                              vocab_size: Optional[int] = None) -> torch.Tensor:
    """log p~ ``[..., V]``: the full-vocabulary teacher that ``tail="bucket"`` is exact for.

    p~_j = p_j on the support, p~_i = q_i (1 - P) / (1 - Q) off it, q = softmax(s / T);
    returned detached (p~ is a constant of the loss). ``kd_loss(s, T * log p~)`` then
    equals ``sparse_kd_loss(s, ids, logprobs, tail="bucket")`` in value and gradient
    (for P <= 1; above 1 the tail is empty and p~ sums to P).
    """
    V = student_logits.shape[-1] if vocab_size is None else vocab_size
    lead = student_logits.shape[:-1]
    cfg = make_config(temperature=temperature, vocab_size=V, config=SparseKDConfig)
    s = student_logits.detach()[..., :V].reshape(-1, V)
    rows = SparseRows(s, teacher_ids.reshape(-1, teacher_ids.shape[-1]),
                      teacher_logprobs.reshape(-1, teacher_ids.shape[-1]), cfg)
    log_tail_p, log_tail_q = rows.tail_logs()
    # Off the support: log q_i + log(1 - P) - log(1 - Q); an empty complement has no entry.
    shift = torch.where(rows.complement_empty, torch.zeros_like(log_tail_p), log_tail_p - log_tail_q)
    out = (rows.a - rows.lse.unsqueeze(-1)) + shift.unsqueeze(-1)
    # The support's log p: an amax scatter, where an empty slot's -inf changes nothing.
    on_support = torch.full_like(out, NEG_INF).scatter_reduce(-1, rows.safe_ids, rows.log_p, reduce="amax")
    return torch.where(rows.member, on_support, out).reshape(*lead, V)


@takes_settings(after=("num_items",), config=SparseKDConfig)
def sparse_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    num_items=None,
    **settings,
) -> torch.Tensor:
    """Reference sparse-teacher loss; same arguments and meaning as ``fastkd.sparse_kd_loss``.

    Computes in float64 when the student logits or the log-probs are float64, otherwise in
    float32 (plain autograd: exact only in float64).

    Args:
        {settings}
        num_items: the denominator of ``reduction="mean"``, as in ``fastkd.kd_loss``.
    """
    cfg = make_config("sparse_kd_loss", config=SparseKDConfig, **settings)
    cfg, num_items = check_sparse_kd_args(student_logits, teacher_ids, teacher_logprobs, labels, cfg, num_items)
    return sparse_kd_loss_with_config(student_logits, teacher_ids, teacher_logprobs, labels, cfg, num_items)


def sparse_kd_loss_with_config(student_logits, teacher_ids, teacher_logprobs, labels, cfg: SparseKDConfig,
                               num_items) -> torch.Tensor:
    """:func:`sparse_kd_loss` on checked input (``cfg.vocab_size`` fixed); the ``torch`` backend."""
    lead = student_logits.shape[:-1]
    K = teacher_ids.shape[-1]
    s = student_logits[..., : cfg.vocab_size].reshape(-1, cfg.vocab_size)
    flat_labels = None if labels is None else labels.reshape(-1)
    rows = sparse_loss_per_row(s, teacher_ids.reshape(-1, K), teacher_logprobs.reshape(-1, K), flat_labels, cfg)
    out = reduce_loss(rows, flat_labels, cfg, num_items)
    return out.reshape(lead) if cfg.reduction == "none" else out
