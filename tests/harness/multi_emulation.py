"""An fp32 emulation of csrc/cuda/kd_multi.cu's arithmetic, on the CPU.

No GPU has run kd_multi.cu. This file computes each row the way that kernel does, step for
step and in float32 (the settings unpacked as kd_params.h unpacks them): the student's and
each active teacher's statistics in base 2, the active teachers compacted in their given
order (an inactive teacher's row is never touched), the mixture's online log-sum-exp over
the slots (its NaN-keeping comparisons, no logarithm for one active teacher), the sum
mode's per-entry combination, finish_entry, the centring, the value sums and the terms at
T = 1 (plain, or with the logit options). torch's float32 exp2 / log2 / tanh stand in for
MUFU EX2 / LG2 and the kernel's tanh, and the sums run in torch's order, not the threads'.

It checks the kernel's formulas against fastkd.reference (tests/test_cuda_multi_emulation.py),
not its CUDA: a slip in the translation between the two is possible, and the GPU tests
(tests/test_cuda_multi_teacher.py) are what check the kernel itself.

``emulate_multi_forward`` has the signature of the ``kd_multi_forward`` operator.
"""
from __future__ import annotations

import math

import torch

from fastkd.config import MultiKernelSettings

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
K_PEAK = 0.5 + 0.0009765625  # kd_device.cuh: kPeak
NEG_INF = float("-inf")
F32 = torch.float32
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")


def _f(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F32)


class _Params:
    """kd_params.h's unpack_multi_settings in float (KDParams)."""

    def __init__(self, ints, floats):
        s = MultiKernelSettings(ints, floats)
        beta = s.beta
        self.divergence = DIVERGENCES[s.divergence_id]
        if self.divergence == "jsd" and beta == 0.0:
            self.divergence = "forward_kl"
        if self.divergence == "jsd" and beta == 1.0:
            self.divergence = "reverse_kl"
        self.inv_t = _f(s.inv_temperature)
        self.temperature = _f(1.0 / s.inv_temperature)
        self.beta = _f(beta)
        self.lb2 = _f(math.log(beta) if beta > 0 else NEG_INF) * _f(LOG2E)
        self.l1b2 = _f(math.log1p(-beta) if beta < 1 else NEG_INF) * _f(LOG2E)
        self.div_weight, self.ce_weight = _f(s.div_weight), _f(s.ce_weight)
        self.scale_s, self.cap_s = _f(s.logit_scale), _f(s.softcap_value)
        self.scale_t, self.cap_t = _f(s.teacher_scale), _f(s.teacher_softcap_value)
        self.eps, self.smooth_per_class, self.z = _f(s.label_smoothing), _f(s.smooth_per_class), _f(s.z_loss)
        self.ignore_index, self.vocab_size = s.ignore_index, s.vocab_size
        self.mixture = s.teacher_mode_id == 0
        # kd_cuda.h: has_options
        self.options = bool(self.scale_s != 1 or self.cap_s != 0 or self.scale_t != 1 or self.cap_t != 0
                            or self.eps != 0 or self.z != 0)


def _transform(x, scale, cap, options):
    """Logits<kOptions>: (x', dx'/dx); the identity without the options."""
    if not options:
        return x, torch.ones_like(x)
    y = x * scale
    if cap == 0:
        return y, torch.full_like(x, float(scale))
    th = torch.tanh(y * (1 / cap))
    return cap * th, scale * (1 - th * th)


def _sum_exp2(x, m, c):
    """sum 2^(x c - ref_point(m, c)), ref_point 0 for an all -inf row."""
    ref = _f(0.0) if m == NEG_INF else m * c
    return torch.exp2(x * c - ref).sum()


def _ref_point(m, c):
    return _f(0.0) if m == NEG_INF else m * c


def _half_sign(d):
    return torch.where(d > 0, _f(0.5), torch.where(d < 0, _f(-0.5), d))


def _log2_add_exp2(u, v):
    hi, lo = torch.maximum(u, v), torch.minimum(u, v)
    return hi + torch.log2(1 + torch.exp2(lo - hi))


def _row(s_raw, t_raws, w, label, grad_scale, P: _Params):
    """Loss and gradient (fp32, [V]) of one counted row; t_raws/w: the active teachers only."""
    V = s_raw.shape[0]
    div, mix_mode = P.divergence, P.mixture
    s, ds = _transform(s_raw, P.scale_s, P.cap_s, P.options)
    ce = P.ce_weight != 0
    hard = ce or (P.options and P.z != 0)
    c = _f(LOG2E) * P.inv_t
    ms = s.max()
    ls = _ref_point(ms, c) + torch.log2(_sum_exp2(s, ms, c))
    raw_is_q = bool(P.temperature == 1)
    if raw_is_q or not hard:
        lraw = ls
    else:
        lraw = _ref_point(ms, _f(LOG2E)) + torch.log2(_sum_exp2(s, ms, _f(LOG2E)))
    na = len(t_raws)
    mixture = mix_mode and na > 0
    ts, offs = [], []
    for t_raw, wj in zip(t_raws, w):
        t, _ = _transform(t_raw, P.scale_t, P.cap_t, P.options)
        mt = t.max()
        lw = torch.log2(wj) if (mixture and wj != 1) else _f(0.0)
        ts.append(t)
        offs.append(_ref_point(mt, c) + torch.log2(_sum_exp2(t, mt, c)) - lw)
    wsum = _f(0.0)
    for wj in w:
        wsum = wsum + wj

    lq = s * c - ls
    q = torch.exp2(lq)
    # teacher_side
    if mixture:
        y = torch.full((V,), NEG_INF, dtype=F32)
        S = torch.zeros(V, dtype=F32)
        for t, off in zip(ts, offs):
            x = t * c - off
            up = ~(x <= y)
            hi, lo = torch.where(up, x, y), torch.where(up, y, x)
            d = torch.where(lo == NEG_INF, _f(0.0), torch.exp2(lo - hi))
            S = torch.where(up, S * d + 1, S + d)
            y = hi
        if na > 1:
            y = y + torch.log2(S)
        v = torch.zeros(V, dtype=F32)
    else:
        y = torch.zeros(V, dtype=F32)
        v = torch.zeros(V, dtype=F32)
        for t, off, wj in zip(ts, offs, w):
            lp = t * c - off
            if div == "reverse_kl":
                y = wj * (lq - lp) + y
                continue
            p = torch.exp2(lp)
            wp = wj * p
            if div == "forward_kl":
                y = y + wp
                v = v + torch.where(p == 0, _f(0.0), wp * (lp - lq))
            elif div == "jsd":
                lm = _log2_add_exp2(lp + P.lb2, lq + P.l1b2)
                y = wj * (lq - lm) + y
                v = v + torch.where(p == 0, _f(0.0), wp * (lp - lm))
            else:
                d = q - p
                y = wj * _half_sign(d) + y
                v = wj * (0.5 * d.abs()) + v
    # finish_entry
    zero = _f(0.0)
    if div == "forward_kl":
        if mixture:
            h = torch.exp2(y)
            v = torch.where(h == 0, zero, h * (y - lq))
        else:
            h = y
    elif div == "reverse_kl":
        h = torch.where(q == 0, zero, _f(LN2) * ((lq - y) if mixture else y))
    elif div == "jsd":
        if mixture:
            m = torch.exp2(y)
            lm = _log2_add_exp2(y + P.lb2, lq + P.l1b2)
            v = torch.where(m == 0, zero, m * (y - lm))
            h = torch.where(q == 0, zero, _f(LN2) * (lq - lm))
        else:
            h = torch.where(q == 0, zero, _f(LN2) * y)
    else:
        if mixture:
            d = q - torch.exp2(y)
            v = 0.5 * d.abs()
            h = _half_sign(d)
        else:
            h = y
    # row_sums and centring
    tot = [zero] * 4
    if div != "forward_kl" and na > 0:
        big = q > K_PEAK
        qh = q * h
        sx = torch.where(big, zero, q).sum()
        sy = torch.where(big, zero, qh).sum()
        sz = torch.where(big, qh, zero).sum()
        sw = torch.where(big, q, zero).sum()
        mass, qh_sum = sx + sw, sy + sz
        tot = [sx / mass, sy / mass, qh_sum / mass, qh_sum]
    # entry_ddiv and the gradient
    if div == "forward_kl":
        dd = wsum * q - h
    else:
        centred = torch.where(q > K_PEAK, h * tot[0] - tot[1], h - tot[2])
        dd = (1 - P.beta if div == "jsd" else _f(1.0)) * q * centred
    gdiv = grad_scale * P.div_weight * P.inv_t
    g = gdiv * dd
    onehot = torch.zeros(V, dtype=torch.bool)
    if label >= 0:
        onehot[label] = True
    r = q if raw_is_q else torch.exp2(s * _f(LOG2E) - lraw)
    lse = _f(LN2) * lraw
    gce = grad_scale * P.ce_weight
    if P.options:
        if hard:
            smooth = ce and P.eps > 0
            ghot = gce * (1 - P.eps)
            gsmooth = gce * P.smooth_per_class if smooth else zero
            graw = (grad_scale * 2 * P.z) * lse + gce if P.z != 0 else gce
            g = graw * r - torch.where(onehot, ghot + gsmooth, gsmooth) + g
        g = g * ds
    elif ce:
        g = gce * torch.where(onehot, r - 1, r) + g
    # the loss
    if div == "forward_kl":
        D = _f(LN2) * v.sum()
    elif div == "reverse_kl":
        D = tot[3]
    elif div == "jsd":
        D = P.beta * _f(LN2) * v.sum() + (1 - P.beta) * tot[3]
    else:
        D = v.sum()
    loss = P.div_weight * D
    if ce:
        s_label = s[label]
        ce_term = lse - (1 - P.eps) * s_label if P.options else lse - s_label
        if P.options and P.eps > 0:
            ce_term = ce_term - P.smooth_per_class * s.sum()
        loss = loss + P.ce_weight * ce_term
    if P.options and P.z != 0:
        loss = loss + P.z * lse * lse
    return loss, g


def emulate_multi_forward(student, teachers, weights, labels, grad_scale, ints, floats):
    """(loss [N] float32, grad like student) as kd_multi_forward on the CUDA kernel."""
    P = _Params(ints, floats)
    n, width = student.shape
    V = P.vocab_size
    scale = grad_scale.reshape(()).to(F32)
    loss = torch.empty(n, dtype=F32)
    grad = torch.zeros(n, width, dtype=F32)
    for r in range(n):
        label = -1
        if labels is not None:
            label = int(labels[r])
            if label == P.ignore_index:
                loss[r] = 0.0
                continue
            if label < 0 or label >= V:
                loss[r] = float("nan")
                grad[r] = float("nan")
                continue
        w_row = weights[:, r].to(F32)
        active = [k for k in range(len(teachers)) if not bool(w_row[k] == 0)]  # a NaN weight is active
        loss[r], grad[r, :V] = _row(student[r, :V].to(F32), [teachers[k][r, :V].to(F32) for k in active],
                                    [w_row[k] for k in active], label, scale, P)
    return loss, grad.to(student.dtype)
