"""The ``torch`` backend's per-shard phases of the vocab-parallel loss, in plain PyTorch.

The operators' contract is in ``fastkd/backends/__init__.py`` (``shard_row_stats``,
``shard_row_sums``, ``shard_write_grad``); these are their readable, float64-capable
versions, which the compiled and Triton phases are tested against. With s, t each side's
transformed logits (``logit_scale``, ``softcap``: fastkd.reference.transform_logits), a = s/T, b = t/T,
the global log-normalisers lse_s = max_s + log sumexp_s (likewise lse_t), q = exp(a - lse_s),
p = exp(b - lse_t):

    forward_kl  dD/da = q - p
    reverse_kl  dD/da = q (h - sum q h),                  h = a - b
    jsd         dD/da = (1 - beta) q (h - sum q h),       h = log q - log m
    tvd         dD/da = q (h - sum q h),                  h = sign(q - p) / 2

and, at T = 1, the CE term's softmax(s) - (1 - eps) onehot(label) - eps/V and the z-loss's
2 lambda lse(s) softmax(s) (csrc/kd_params.h states the whole contract); the gradient with
respect to the raw logits carries the transform's chain factor. Entries of probability
zero contribute nothing (0 log 0 = 0), as in ``fastkd.reference``.
"""
from __future__ import annotations

import math

import torch

from ..reference import transform_logits
from . import ShardPhases, loss_dtype

PEAKED = 0.5 + 1.0 / 1024  # the C++ kernel's threshold for the peaked-row centring (kPeaked)


def _scaled(student, teacher, cfg):
    """The shard's counted columns as a = s'/T, b = t'/T in the accumulation dtype, and s'
    (each side's transformed logits)."""
    dtype = loss_dtype(student, teacher)
    s = transform_logits(student[:, : cfg.vocab_size].to(dtype), cfg.logit_scale, cfg.softcap)
    t = transform_logits(teacher[:, : cfg.vocab_size].to(dtype), cfg.teacher_scale, cfg.teacher_cap)
    return s, s * cfg.inv_temperature, t * cfg.inv_temperature


def _chain(student, cfg):
    """ds'/ds per entry of the counted columns (a number without a softcap)."""
    if cfg.softcap is None:
        return cfg.logit_scale
    x = student[:, : cfg.vocab_size].to(loss_dtype(student, student)) * (cfg.logit_scale / cfg.softcap)
    return cfg.logit_scale * (1 - torch.tanh(x).square())


def _exp_from(x, m):
    """exp(x - m) per row, 0 where the row's max m is -inf (no entry counts)."""
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    return (x - m[:, None]).exp()


def _times(weight, x):
    """weight * x with 0 where weight is 0 (0 * inf = 0: -inf logits are legal)."""
    return torch.where(weight == 0, torch.zeros_like(x), weight * x)


def row_stats(student, teacher, cfg):
    s, a, b = _scaled(student, teacher, cfg)
    max_s, max_t = a.amax(-1), b.amax(-1)
    es, et = _exp_from(a, max_s), _exp_from(b, max_t)
    raw = torch.zeros_like(max_s)
    if cfg.has_hard_label_terms:
        raw = _exp_from(s, max_s * cfg.temperature).sum(-1)
    sum_s = s.sum(-1) if cfg.label_smoothing != 0.0 else torch.zeros_like(max_s)
    if cfg.divergence == "forward_kl":
        value = _times(et, b - a).sum(-1)
    elif cfg.divergence == "reverse_kl":
        value = _times(es, a - b).sum(-1)
    else:
        value = torch.zeros_like(max_s)
    return torch.stack([max_s, es.sum(-1), max_t, et.sum(-1), raw, value, sum_s], dim=1)


def _log_probs(a, b, stats):
    lse_s = stats[:, 0] + stats[:, 1].log()
    lse_t = stats[:, 2] + stats[:, 3].log()
    return a - lse_s[:, None], b - lse_t[:, None]


def _log_m(log_q, log_p, beta):
    """log m, m = beta p + (1 - beta) q, as a log-sum-exp (finite where both are 0: unused there)."""
    both_zero = torch.isneginf(log_p) & torch.isneginf(log_q)
    lp = torch.where(both_zero, torch.zeros_like(log_p), log_p)
    lq = torch.where(both_zero, torch.zeros_like(log_q), log_q)
    return torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))


def _jsd_h(log_q, log_m):
    """h = log q - log m, 0 where q = 0."""
    return torch.where(log_q.exp() == 0, torch.zeros_like(log_q), log_q - log_m)


def row_sums(student, teacher, stats, cfg):
    _, a, b = _scaled(student, teacher, cfg)
    log_q, log_p = _log_probs(a, b, stats.to(a.dtype))
    q, p = log_q.exp(), log_p.exp()
    zero = torch.zeros_like(stats[:, 0])
    if cfg.divergence == "tvd":
        dq = q - p
        return torch.stack([0.5 * dq.abs().sum(-1), torch.where(dq > 0, q, 0).sum(-1),
                            torch.where(dq < 0, q, 0).sum(-1), torch.where(dq == 0, q, 0).sum(-1), zero], dim=1)
    if cfg.divergence == "reverse_kl":
        h = torch.where(q == 0, torch.zeros_like(log_q), log_q - log_p)
        kl_pm = zero
    elif cfg.divergence == "jsd":
        log_m = _log_m(log_q, log_p, cfg.beta)
        h = _jsd_h(log_q, log_m)
        kl_pm = _times(p, log_p - log_m).sum(-1)
    else:
        raise ValueError(f"fastkd: shard_row_sums is for reverse_kl, jsd and tvd, got {cfg.divergence}")
    qh = _times(q, h)
    big = q > PEAKED
    return torch.stack([torch.where(big, 0, q).sum(-1), torch.where(big, 0, qh).sum(-1),
                        torch.where(big, q, 0).sum(-1), torch.where(big, qh, 0).sum(-1), kl_pm], dim=1)


def _centred(q, h, sums, c):
    """c q (h - sum q h / sum q), from the global row sums (small, big) of q and q h."""
    qh = (sums[:, 1] + sums[:, 3]) / (sums[:, 0] + sums[:, 2])
    return c * q * (h - qh[:, None])


def write_grad(student, teacher, labels, grad_scale, stats, sums, vocab_start, cfg):
    s, a, b = _scaled(student, teacher, cfg)
    stats = stats.to(a.dtype)
    log_q, log_p = _log_probs(a, b, stats)
    q, p = log_q.exp(), log_p.exp()
    if cfg.divergence == "forward_kl":
        ddiv = q - p
    elif cfg.divergence == "reverse_kl":
        ddiv = _centred(q, torch.where(q == 0, 0, log_q - log_p), sums, 1.0)
    elif cfg.divergence == "jsd":
        ddiv = _centred(q, _jsd_h(log_q, _log_m(log_q, log_p, cfg.beta)), sums, 1.0 - cfg.beta)
    else:
        dq = q - p
        h = torch.where(dq > 0, 0.5, torch.where(dq < 0, -0.5, 0.0)).to(q.dtype)
        # sum q h = (mass where q > p - mass where q < p) / 2, over the total mass.
        qh = 0.5 * (sums[:, 1] - sums[:, 2]) / (sums[:, 1] + sums[:, 2] + sums[:, 3])
        ddiv = q * (h - qh[:, None])
    grad = cfg.div_weight * cfg.inv_temperature * ddiv
    with_ce = labels is not None and cfg.ce_weight != 0.0
    if with_ce or cfg.z_loss != 0.0:
        lse_raw = stats[:, 0] * cfg.temperature + stats[:, 4].log()
        c_raw = 2 * cfg.z_loss * lse_raw + (cfg.ce_weight if with_ce else 0.0)
        grad = grad + c_raw[:, None] * (s - lse_raw[:, None]).exp()
    if with_ce:
        local = labels - vocab_start
        here = (local >= 0) & (local < cfg.vocab_size)
        onehot = torch.zeros_like(grad)
        onehot.scatter_(1, torch.where(here, local, 0)[:, None], here.to(grad.dtype)[:, None])
        grad = grad - cfg.ce_weight * ((1.0 - cfg.label_smoothing) * onehot + cfg.smooth_per_class)
    grad = grad * _chain(student, cfg) * grad_scale.to(grad.dtype)
    if labels is not None:
        grad = torch.where((labels == cfg.ignore_index)[:, None], torch.zeros_like(grad), grad)
    out = torch.zeros_like(student)
    out[:, : cfg.vocab_size] = grad.to(student.dtype)
    return out


def phases() -> ShardPhases:
    return ShardPhases(row_stats, row_sums, write_grad)
