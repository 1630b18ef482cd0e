"""Fused knowledge-distillation loss and gradient over dense logits: one program per row.

Per row, with student logits s, teacher logits t, temperature T and the vocabulary cut to
the first V columns:

    q = softmax(s / T)    p = softmax(t / T)    log q = s/T - lse(s/T)    log p = t/T - lse(t/T)

    forward_kl  D = sum p (log p - log q)            dD/d(s/T) = q - p
    reverse_kl  D = sum q (log q - log p)            dD/d(s/T) = q (h - sum q h),  h = log q - log p
    jsd         D = beta KL(p||m) + (1-beta) KL(q||m),  m = beta p + (1-beta) q
                                                     dD/d(s/T) = (1-beta) q (h - sum q h),  h = log q - log m
    tvd         D = 1/2 sum |p - q|                  dD/d(s/T) = q (h - sum q h),  h = sign(q - p)/2

    loss = div_weight * D + ce_weight * (lse(s) - s[label])
    ds   = grad_scale * (div_weight * dD/d(s/T) / T + ce_weight * (softmax(s) - onehot(label)))

(div_weight = alpha T^2 or alpha, ce_weight = 1 - alpha, grad_scale the reduction's
1/denominator, read from device memory). With the logit options (rows.py: OPTS; the
contract is csrc/kd_params.h's) s and t above are each side's transformed logits s', t'
from their loads on, and with eps = label_smoothing, lambda = z_loss, lse' = lse(s'):

    loss += ce_weight ((1 - eps) (lse' - s'[label]) + eps/V sum_i (lse' - s'_i)) + lambda lse'^2
    ds'   = ... + (ce_weight + 2 lambda lse') softmax(s') - ce_weight ((1 - eps) onehot + eps/V)
    ds    = ds' * m (1 - (s'/c)^2)      (m alone without a softcap c) The semantics, including every guard, are those
of the C++ CPU kernel (csrc/cpu/kd_cpu.cpp), which this file mirrors. The kernel runs the
three phases of every backend (rows.py):

    row_stats   max and sum-exp of both sides, plus the T=1 sum-exp of s for the CE term
                (or the z-loss) when T != 1: ``row_stats_block`` / ``row_stats_sweep`` (an online softmax
                whose running sums are per-lane vectors), or read from a caller's row_stats
    row_sums    the divergence value D and the sums the gradient needs: sum q h (reverse_kl,
                jsd) or the student mass on each side of p (tvd); sums of the terms in
                registers (single block) or ``_row_sums_sweep`` over ``_row_sums_parts``
                (multi block). forward_kl needs none before its gradient: its D is summed
                during write_grad
    write_grad  ``write_grad`` per block, ``fill_row`` past the block

Numerics:

* Logarithms are kept in base 2: with c = log2(e)/T, x = s*c is s/T in bits, so every
  exponential is one exp2 of one FMA (``exp2(s*c - lse2)``), and log q = (x - lse2) ln 2.
* The exponentials are anchored at A = (max * 1/T) * log2(e) rounded exactly as a caller's
  external ``row_stats`` (max in s/T units) would be, so internal and external statistics
  give bitwise the same result.
* A max of -inf (every entry so far masked) anchors at 0 instead: exp2(-inf - -inf) is NaN.
  0 log 0 = 0 by selects (``where(q == 0, 0, ...)``), which also lets NaN propagate.
* JSD's log m is a log-sum-exp of (log p + log beta, log q + log(1-beta)), with log1p done
  as log(y) * e/(y - 1) so a tiny e is not rounded away; both -inf gives -inf, not NaN.
* ``h - sum q h`` cancels in fp32 at the entry k holding q_k > 1/2 + 2^-10 (peaked rows);
  there it is computed as h_k sum_{j!=k} q_j - sum_{j!=k} q_j h_j (sums over the small
  entries). (Not 1/2: two tied entries of exact mass 1/2 each can both round above 1/2,
  and the formula, which assumes one such entry, then gave them a zero gradient.)
  For TVD h takes three values, so h_i - sum q h is exact from the masses on each side.
* The centring constant of reverse_kl/jsd is sum q h / sum q over the fp32 q the kernel
  computed (sum q = 1 + O(1e-6) after rounding), which keeps the gradient invariant to a
  common shift of h as the exact one is (``_centring``). Row sums are trees within a block
  and fp64 scalars across the blocks of a row.
* Ignored rows (label == ignore_index): zero loss, zero gradient row. Labels outside
  [0, V): NaN loss and NaN gradient row (never silently a number). Student columns
  >= V get zero gradient. The gradient is written in the student's dtype; the loss is fp32.

The single-block and multi-block shapes of the kernel, and their traffic, are described
in launch.py. On the CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1,
set before triton is imported); everything is cast to fp32 right after loading.
"""
import math

import torch
import triton
import triton.language as tl

from ...config import DIVERGENCES, KernelSettings, resolve_divergence
from .. import ROW_SUMS_WIDTH, check_operator_args
from . import launch
from .launch import (base_lead, ce_mode, kernel_launch, launch_config, logit_options, peel_columns, vocab_splits,
                     warps_for)
from .rows import (CE_RAW, CE_SHARED, LN2, LOG2E, OPT_NO_CE, OPT_SMOOTH, ROW_STATS_WIDTH, STATS_WIDTH,
                   add_block_sums, aligned_base, anchor, anchors, entropy_terms, fill_row, first_max_column,
                   hard_label_grads, hard_label_loss, load_block, load_pair, row_base, row_stats_block,
                   row_stats_sweep, row_stats_sweep_top1, row_lead, store_blank_stats, store_stats, student_x, sum3,
                   sum_pair, write_grad, write_grad_block, zero32, zero64)

DIVERGENCE_IDS = {name: i for i, name in enumerate(DIVERGENCES)}  # the kernels' ids (fastkd/config.py)
_FORWARD_KL = tl.constexpr(DIVERGENCE_IDS["forward_kl"])
_JSD = tl.constexpr(DIVERGENCE_IDS["jsd"])
_TVD = tl.constexpr(DIVERGENCE_IDS["tvd"])  # reverse_kl: the remaining case

_ROW_STATS_WIDTH = tl.constexpr(ROW_STATS_WIDTH)
_ROW_SUMS_WIDTH = tl.constexpr(ROW_SUMS_WIDTH)
_STATS_WIDTH = tl.constexpr(STATS_WIDTH)
_CE_SHARED = tl.constexpr(CE_SHARED)  # CE at T == 1: its softmax is the student's own
_CE_RAW = tl.constexpr(CE_RAW)        # CE at T != 1: a third sum-exp, of the raw logits
_SMOOTH = tl.constexpr(OPT_SMOOTH)
_NO_CE = tl.constexpr(OPT_NO_CE)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------
# Per-element terms of each divergence (all logarithms in bits).

@triton.jit
def _forward_kl_terms(s, t, c, lse2_s, lse2_t):
    lq = s * c - lse2_s
    lp = t * c - lse2_t
    q = tl.exp2(lq)
    p = tl.exp2(lp)
    d = tl.where(p == 0.0, 0.0, p * (lp - lq))
    return d, q - p


@triton.jit
def _log2_mixture(lp, lq, log2_beta, log2_1mb):
    """log2(beta 2^lp + (1-beta) 2^lq) as a log-sum-exp; -inf (not NaN) when both are -inf."""
    u = lp + log2_beta
    v = lq + log2_1mb
    # NaN-propagating max/min: a NaN teacher entry must not become a finite log m.
    hi = tl.maximum(u, v, propagate_nan=tl.PropagateNan.ALL)
    e = tl.exp2(tl.minimum(u, v, propagate_nan=tl.PropagateNan.ALL) - hi)
    # log2(1 + e) = log2(y) * e / (y - 1): cancels the rounding of y = 1 + e for tiny e.
    y = 1.0 + e
    ym1 = y - 1.0
    log1p2 = tl.where(ym1 == 0.0, e * LOG2E, tl.log2(y) * (e / ym1))
    return tl.where(hi == float("-inf"), hi, hi + log1p2)


@triton.jit
def _centred_terms(s, t, c, lse2_s, lse2_t, log2_beta, log2_1mb, DIVERGENCE: tl.constexpr):
    """q, h (bits) and JSD's p (log p - log m) term, for reverse_kl and jsd."""
    lq = s * c - lse2_s
    lp = t * c - lse2_t
    q = tl.exp2(lq)
    if DIVERGENCE == _JSD:
        lm = _log2_mixture(lp, lq, log2_beta, log2_1mb)
        p = tl.exp2(lp)
        pm = tl.where(p == 0.0, 0.0, p * (lp - lm))
        h = tl.where(q == 0.0, 0.0, lq - lm)
    else:
        pm = tl.zeros_like(q)
        h = tl.where(q == 0.0, 0.0, lq - lp)
    return q, h, pm


# An entry with q > _PEAK is "big": at most one per row even after rounding (see the
# module docstring). The margin is far above q's rounding (~1e-6), and small: entries in
# (1/2, _PEAK] take the direct formula, which cancels there. 3/4 instead doubled JSD's
# error at T = 0.5 in an fp32 emulation (V = 262144: 1.7e-4 -> 3.6e-4 from float64).
_PEAK = tl.constexpr(0.5 + 2.0 ** -10)


@triton.jit
def _centred_sums(q, h):
    """Per-element parts of sum_small q, sum_small q h, sum_big q h, sum_big q (big: q > _PEAK)."""
    big = q > _PEAK
    qh = q * h
    return tl.where(big, 0.0, q), tl.where(big, 0.0, qh), tl.where(big, qh, 0.0), tl.where(big, q, 0.0)


@triton.jit
def _centring(small_q, small_qh, big_qh, big_q):
    """The centring constants from the row sums (fp32 or fp64): (sum q h / sum q,
    sum_small q / sum q, sum_small q h / sum q, sum q h), in fp32 (small: q <= _PEAK).

    Divided by the mass sum q of the fp32 q that the kernel computed, not by 1: each q_i
    carries its own rounding (~|log2 q_i| ulps from the exponent s_i c - lse), so sum q =
    1 + O(1e-6), and h - sum q h then shifts every entry by (1 - sum q) sum q h. Where the
    gradient is small against h (JSD's h saturates at log 1/(1-beta) on the student's mass;
    low T) that shift dominated the error. Normalised, the centring is invariant to a
    common shift of h, as the exact gradient is. The sums are added in their own precision
    and the quotients taken in fp32 (fp64 here spilled in the 8192-column JSD block; the
    division-free first-order form x - x (sum q - 1) took the fp32 multi-block JSD build
    from 64 to 78 registers).

    Measured under the interpreter against float64 (tests/harness/cases.py LARGE_VOCAB_CENTRED:
    V = 32000, fp32, 4 rows), before -> after (with the fp64 row sums of _kd_row): reverse
    KL T = 0.5 3.7e-6 -> 1.1e-6, JSD T = 1 5.0e-6 -> 1.8e-6, JSD T = 0.5 2.6e-4 -> 3.1e-5.
    """
    qh = (small_qh + big_qh).to(tl.float32)
    mass = (small_q + big_q).to(tl.float32)
    return tl.div_rn(qh, mass), tl.div_rn(small_q.to(tl.float32), mass), tl.div_rn(small_qh.to(tl.float32), mass), qh


@triton.jit
def _centre(q, h, small_q, small_qh, h_mean, scale):
    # h_k - mean h cancels where q_k is near 1; there it is h_k sum_small q - sum_small q h
    # (both already divided by sum q).
    return scale * q * tl.where(q > _PEAK, h * small_q - small_qh, h - h_mean)


@triton.jit
def _tvd_terms(s, t, c, lse2_s, lse2_t):
    """q, q - p, 0.5 |q - p| and the student mass where q > p, q < p, q == p."""
    q = tl.exp2(s * c - lse2_s)
    p = tl.exp2(t * c - lse2_t)
    d = q - p
    return q, d, 0.5 * tl.abs(d), tl.where(d > 0.0, q, 0.0), tl.where(d < 0.0, q, 0.0), tl.where(d == 0.0, q, 0.0)


@triton.jit
def _tvd_grad(q, d, g_pos, g_neg, g_tie):
    return q * tl.where(d > 0.0, g_pos, tl.where(d < 0.0, g_neg, g_tie))


@triton.jit
def _row_sums_parts(s, t, c, lse2_s, lse2_t, log2_beta, log2_1mb, DIVERGENCE: tl.constexpr):
    """Per-element parts of the four row sums: for tvd 0.5 |q - p| and the student mass
    where q > p, q < p, q == p; for reverse_kl and jsd the ``_centred_sums`` of q and h."""
    if DIVERGENCE == _TVD:
        q, d, x0, x1, x2, x3 = _tvd_terms(s, t, c, lse2_s, lse2_t)
    else:
        q, h, pm = _centred_terms(s, t, c, lse2_s, lse2_t, log2_beta, log2_1mb, DIVERGENCE)
        x0, x1, x2, x3 = _centred_sums(q, h)
    return x0, x1, x2, x3


@triton.jit
def _row_sums_sweep(s_base, t_base, lead, begin, end, V, c, lse2_s, lse2_t, log2_beta, log2_1mb,
                    acc0, acc1, acc2, acc3, xo, DIVERGENCE: tl.constexpr, BLOCK: tl.constexpr, PEEL: tl.constexpr,
                    OPTS: tl.constexpr):
    """row_sums of the multi-block path (tvd, reverse_kl, jsd) over the blocks at positions
    [begin, end) of the row's frame (``row_stats_sweep``): one more read of the row,
    the four sums of ``_row_sums_parts`` added block by block onto acc0..acc3, in their
    precision (``add_block_sums``). Scalar running sums: vector accumulators would cost
    4 x 8 registers on top of the divergence math."""
    for start in range(begin, end, BLOCK):
        s, t, _ = load_block(s_base, t_base, start, lead, V, xo, BLOCK, PEEL, OPTS)
        x0, x1, x2, x3 = _row_sums_parts(s, t, c, lse2_s, lse2_t, log2_beta, log2_1mb, DIVERGENCE)
        acc0, acc1, acc2, acc3 = add_block_sums(acc0, acc1, acc2, acc3, x0, x1, x2, x3)
    return acc0, acc1, acc2, acc3


@triton.jit
def _row_sums_whole_row(s_base, t_base, lead, V, c, lse2_s, lse2_t, log2_beta, log2_1mb, xo, DIVERGENCE: tl.constexpr,
                        BLOCK: tl.constexpr, PEEL: tl.constexpr, OPTS: tl.constexpr):
    """``_row_sums_sweep`` over the whole row, in each divergence's precision: fp32 running
    sums for tvd's side masses, fp64 for the centring sums of reverse_kl and jsd."""
    if DIVERGENCE == _TVD:
        zero = zero32()
    else:
        zero = zero64()
    return _row_sums_sweep(s_base, t_base, lead, 0, V + lead, V, c, lse2_s, lse2_t, log2_beta, log2_1mb,
                           zero, zero, zero, zero, xo, DIVERGENCE, BLOCK, PEEL, OPTS)


@triton.jit
def _grad_constants(sum0, sum1, sum2, sum3, beta, DIVERGENCE: tl.constexpr):
    """From the four row sums (tvd, reverse_kl, jsd): the gradient's row constants k0..k3
    (what ``_block_grad`` reads) and the sums' value of D (``_divergence_value``)."""
    if DIVERGENCE == _TVD:
        # h_i - sum_j q_j h_j = sum_j q_j (h_i - h_j): masses on the other sides, exact.
        # D <= 1 is finite, so D - D is 0 unless the row holds a NaN, which the sign
        # comparisons would otherwise drop from the gradient.
        D, q_pos, q_neg, q_tie = sum0, sum1, sum2, sum3
        nan_or_zero = D - D
        k0 = q_neg + 0.5 * q_tie + nan_or_zero
        k1 = -(q_pos + 0.5 * q_tie) + nan_or_zero
        k2 = 0.5 * (q_neg - q_pos) + nan_or_zero
        k3 = 0.0
        value = D
    else:  # reverse_kl, jsd: dD/d(s/T) = scale q (h - sum q h)
        h_mean, small_q_n, small_qh_n, qh = _centring(sum0, sum1, sum2, sum3)
        k0, k1, k2 = small_q_n, small_qh_n, h_mean
        if DIVERGENCE == _JSD:
            k3 = (1.0 - beta) * LN2
        else:
            k3 = LN2
        value = qh
    return k0, k1, k2, k3, value


@triton.jit
def _divergence_value(sums_value, sweep_value, beta, DIVERGENCE: tl.constexpr):
    """D from the row sums' value (``_grad_constants``: tvd's D, the centred sum q h) and
    the write_grad sweep's (forward_kl's sum p (lp - lq), JSD's sum p (lp - lm), in bits).
    Linear in each: the split path adds it up per split."""
    if DIVERGENCE == _FORWARD_KL:
        return sweep_value * LN2
    elif DIVERGENCE == _TVD:
        return sums_value
    elif DIVERGENCE == _JSD:
        return (beta * sweep_value + (1.0 - beta) * sums_value) * LN2
    else:
        return sums_value * LN2


@triton.jit
def _write_grad_sweep(s_base, t_base, g_base, lead, begin, end, V, g_width, label, c, lse2_s, lse2_t, log2_beta,
                      log2_1mb, k0, k1, k2, k3, gdiv, lse2_r, gh, xo,
                      DIVERGENCE: tl.constexpr, CE: tl.constexpr, BLOCK: tl.constexpr, PEEL: tl.constexpr,
                      OPTS: tl.constexpr):
    """write_grad of the multi-block path over the blocks at positions [begin, end) of a
    row's frame (rows.py: peeled rows; 0 and g_width + lead: the whole row), given the
    row constants k0..k3 (``_grad_constants``; unused by forward_kl). Returns the sweep's
    value of D (``_divergence_value``): forward_kl's terms summed as a per-lane vector,
    JSD's sum p (log p - log m) (the loss only) one block sum per block: as a fifth sum of
    the sums sweep it took the 16-bit build from 64 to 70 registers (a 4-byte spill under
    the CUDA toolkit's ptxas). With label smoothing (OPT_SMOOTH) also the sum of s' over
    the blocks' columns below V (the CE term's eps/V part), else 0: (value, sum_s)."""
    value, sum_s, _, _ = _write_grad_sweep_stats(s_base, t_base, g_base, lead, begin, end, V, g_width, label, c,
                                                  lse2_s, lse2_t, log2_beta, log2_1mb, k0, k1, k2, k3, gdiv, lse2_r,
                                                  gh, xo, DIVERGENCE, CE, BLOCK, PEEL, OPTS, False)
    return value, sum_s


@triton.jit
def _write_grad_sweep_stats(s_base, t_base, g_base, lead, begin, end, V, g_width, label, c, lse2_s, lse2_t,
                            log2_beta, log2_1mb, k0, k1, k2, k3, gdiv, lse2_r, gh, xo,
                            DIVERGENCE: tl.constexpr, CE: tl.constexpr, BLOCK: tl.constexpr, PEEL: tl.constexpr,
                            OPTS: tl.constexpr, STATS: tl.constexpr):
    """``_write_grad_sweep``, and with STATS the sums of p log2 p and q log2 q over its
    blocks (``entropy_terms``, in fp32; the entropies are minus LN2 times them): (value,
    sum_s, sum p log2 p, sum q log2 q), the last two 0 without STATS. Per-lane running sums
    (a joint block reduction per block instead took the split write pass from 75 to 80
    registers for sm_90, 80 to 114 peeled), except for JSD, which adds them to the block
    reduction of its p (log p - log m) (per lane they spilled beside its centring)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    kl_pm = zero32()
    sum_s = zero32()
    if DIVERGENCE == _JSD:
        e_p = zero32()
        e_q = zero32()
    else:
        e_p = tl.zeros([BLOCK], dtype=tl.float32)
        e_q = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(begin, end, BLOCK):
        s, t, block_cols = load_block(s_base, t_base, start, lead, V, xo, BLOCK, PEEL, OPTS)
        if STATS and DIVERGENCE != _JSD:
            e_p += entropy_terms(t * c, lse2_t)
            e_q += entropy_terms(s * c, lse2_s)
        if (_SMOOTH & OPTS) != 0:
            sum_s += tl.sum(tl.where((block_cols >= 0) & (block_cols < V), s, 0.0), axis=0)
        if DIVERGENCE == _FORWARD_KL:
            d, w = _forward_kl_terms(s, t, c, lse2_s, lse2_t)
            acc += d
        elif DIVERGENCE == _TVD:
            q, diff, half_abs, pos, neg, tie = _tvd_terms(s, t, c, lse2_s, lse2_t)
            w = _tvd_grad(q, diff, k0, k1, k2)
        else:
            q, h, pm = _centred_terms(s, t, c, lse2_s, lse2_t, log2_beta, log2_1mb, DIVERGENCE)
            if DIVERGENCE == _JSD:
                if STATS:
                    b_pm, b_p, b_q = sum3(pm, entropy_terms(t * c, lse2_t), entropy_terms(s * c, lse2_s))
                    kl_pm += b_pm
                    e_p += b_p
                    e_q += b_q
                else:
                    kl_pm += tl.sum(pm, axis=0)
            w = _centre(q, h, k0, k1, k2, k3)
        write_grad_block(g_base, start, block_cols, V, g_width, s, w, gdiv, label, lse2_r, gh, xo, CE, BLOCK, PEEL,
                         OPTS)
    if DIVERGENCE != _JSD:
        e_p = tl.sum(e_p, axis=0)
        e_q = tl.sum(e_q, axis=0)
    if DIVERGENCE == _FORWARD_KL:
        return tl.sum(acc, axis=0), sum_s, e_p, e_q
    else:
        return kl_pm, sum_s, e_p, e_q


# ---------------------------------------------------------------------------------------
# The forward kernel: row_stats, then row_sums and write_grad per divergence.

@triton.jit
def _external_row_sums(sums_ptr, DIVERGENCE: tl.constexpr):
    """The four row sums from a caller's row_sums (the vocab-parallel shard layout,
    backends/__init__.py: sums of q h in nats, big q before big q h) in this kernel's form
    (sums of q h in bits, big q h before big q)."""
    v0 = tl.load(sums_ptr + 0)
    v1 = tl.load(sums_ptr + 1)
    v2 = tl.load(sums_ptr + 2)
    v3 = tl.load(sums_ptr + 3)
    if DIVERGENCE == _TVD:
        return v0, v1, v2, v3
    else:
        return v0, v1 * LOG2E, v3 * LOG2E, v2


@triton.jit
def _kd_row(s_row, t_row, g_row, lead, loss_ptr, stats_ptr, sums_ptr, label, V, g_width,
            c, inv_temperature, temperature, beta, log2_beta, log2_1mb,
            div_weight, ce_weight, gdiv, gce, scale, xo,
            DIVERGENCE: tl.constexpr, CE: tl.constexpr, HAS_STATS: tl.constexpr, HAS_SUMS: tl.constexpr,
            BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr, PEEL: tl.constexpr, OPTS: tl.constexpr,
            stats_out, RETURN_STATS: tl.constexpr):
    """One row: its loss into loss_ptr and its gradient. label -1: none in this row (a
    vocab-parallel slice without the label's column: no one-hot, no label logit).
    HAS_SUMS: the row sums come from sums_ptr (vocab-parallel: summed over the slices).
    s and t hold s' and t' from their loads on (rows.py: the logit transforms).
    RETURN_STATS: the row's per-token diagnostics into stats_out (rows.py: store_stats):
    the argmax columns from row_stats (a max with its index per block: row_stats_sweep_top1;
    single block: argmax of the row in registers), the entropies' sums where write_grad
    forms p and q (``_write_grad_sweep_stats``), D before div_weight. The operators with
    stats take no row_stats or row_sums from outside."""
    tl.static_assert(not (RETURN_STATS and (HAS_STATS or HAS_SUMS)), "return_stats computes its own row_stats")
    CE_TERM: tl.constexpr = CE != 0 and (_NO_CE & OPTS) == 0  # else the T = 1 statistics are the z-loss's
    cols = tl.arange(0, BLOCK)
    s_label = 0.0
    if CE_TERM:
        # before an in-place write over it
        s_label = student_x(tl.load(s_row + tl.maximum(label, 0)).to(tl.float32), True, xo, OPTS) * \
            (label >= 0).to(tl.float32)
    sum_s = 0.0  # of s' over the row (label smoothing's term of the loss)
    if SINGLE_BLOCK:
        s, t = load_pair(s_row, t_row, cols, V, xo, OPTS)
        if CE_TERM and (_SMOOTH & OPTS) != 0:
            sum_s = tl.sum(tl.where(cols < V, s, 0.0), axis=0)
    else:  # the sweeps' frame (rows.py: peeled rows)
        s_base = aligned_base(s_row, lead, PEEL)
        t_base = aligned_base(t_row, lead, PEEL)
        g_base = aligned_base(g_row, lead, PEEL)

    # row_stats: raw maxes (or s/T-unit maxes from the caller) and anchored sums.
    if HAS_STATS:
        ms_nat = tl.load(stats_ptr + 0)
        z_s = tl.load(stats_ptr + 1)
        mt_nat = tl.load(stats_ptr + 2)
        z_t = tl.load(stats_ptr + 3)
        z_r = tl.load(stats_ptr + 4)
        a_s = ms_nat * LOG2E
        a_t = mt_nat * LOG2E
        a_r = (temperature * ms_nat) * LOG2E
    else:
        if SINGLE_BLOCK:
            m_s, z_s, m_t, z_t, z_r = row_stats_block(s, t, c, inv_temperature, temperature, CE == _CE_RAW)
        else:
            m_s, z_s, m_t, z_t, z_r, col_s, col_t = row_stats_sweep_top1(s_base, t_base, lead, 0, V + lead, V, c,
                                                                         inv_temperature, temperature, xo, BLOCK,
                                                                         CE == _CE_RAW, PEEL, OPTS, RETURN_STATS)
        a_s, a_t, a_r = anchors(m_s, m_t, inv_temperature, temperature)
    if CE == _CE_SHARED:  # T == 1: the CE softmax is the student's own
        z_r = z_s
        a_r = a_s
    lse2_s = anchor(a_s) + tl.log2(z_s)
    lse2_t = anchor(a_t) + tl.log2(z_t)
    lse2_r = 0.0
    if CE != 0:
        lse2_r = anchor(a_r) + tl.log2(z_r)
    gh = hard_label_grads(gce, scale, lse2_r, xo, OPTS)
    if RETURN_STATS:  # the row in registers: its entropies' sums and argmaxes here
        e_p, e_q = zero32(), zero32()
        if SINGLE_BLOCK:
            e_p, e_q = sum_pair(entropy_terms(t * c, lse2_t), entropy_terms(s * c, lse2_s))
            col_s = first_max_column(s, m_s, cols)
            col_t = first_max_column(t, m_t, cols)

    # row_sums and write_grad.
    if DIVERGENCE == _FORWARD_KL:
        # No row sum is needed before the gradient: D is summed while write_grad runs.
        if SINGLE_BLOCK:
            d, w = _forward_kl_terms(s, t, c, lse2_s, lse2_t)
            write_grad(g_row, cols, V, g_width, s, w, gdiv, label, lse2_r, gh, xo, CE, OPTS)
            D = _divergence_value(0.0, tl.sum(d, axis=0), beta, DIVERGENCE)
        else:
            d_sum, sum_s, e_p, e_q = _write_grad_sweep_stats(s_base, t_base, g_base, lead, 0, g_width + lead, V,
                                                             g_width, label, c, lse2_s, lse2_t, log2_beta, log2_1mb,
                                                             0.0, 0.0, 0.0, 0.0, gdiv, lse2_r, gh, xo, DIVERGENCE, CE,
                                                             BLOCK, PEEL, OPTS, RETURN_STATS)
            D = _divergence_value(0.0, d_sum, beta, DIVERGENCE)
    elif DIVERGENCE == _TVD:
        if SINGLE_BLOCK:
            q, diff, half_abs, pos, neg, tie = _tvd_terms(s, t, c, lse2_s, lse2_t)
            sum0 = tl.sum(half_abs, axis=0)
            sum1 = tl.sum(pos, axis=0)
            sum2 = tl.sum(neg, axis=0)
            sum3 = tl.sum(tie, axis=0)
        if HAS_SUMS:
            sum0, sum1, sum2, sum3 = _external_row_sums(sums_ptr, DIVERGENCE)
        elif not SINGLE_BLOCK:
            sum0, sum1, sum2, sum3 = _row_sums_whole_row(s_base, t_base, lead, V, c, lse2_s, lse2_t, log2_beta,
                                                         log2_1mb, xo, DIVERGENCE, BLOCK, PEEL, OPTS)
        k0, k1, k2, k3, sums_value = _grad_constants(sum0, sum1, sum2, sum3, beta, DIVERGENCE)
        if SINGLE_BLOCK:
            write_grad(g_row, cols, V, g_width, s, _tvd_grad(q, diff, k0, k1, k2), gdiv, label, lse2_r, gh, xo, CE,
                       OPTS)
        else:
            _, sum_s, e_p, e_q = _write_grad_sweep_stats(s_base, t_base, g_base, lead, 0, g_width + lead, V,
                                                         g_width, label, c, lse2_s, lse2_t, log2_beta, log2_1mb, k0,
                                                         k1, k2, k3, gdiv, lse2_r, gh, xo, DIVERGENCE, CE, BLOCK,
                                                         PEEL, OPTS, RETURN_STATS)
        D = _divergence_value(sums_value, 0.0, beta, DIVERGENCE)
    else:  # reverse_kl, jsd: dD/d(s/T) = scale q (h - sum q h)
        # Row sums: a tree within a block (tl.sum / tl.reduce: a few in-thread adds, then
        # shuffles), and across the blocks of a row (16 at V = 32000, 128 at 262144) fp64
        # running sums, one fp64 add per sum per block. Measured under the interpreter, fp32,
        # V = 128256, T = 1 (with the normalised centring): JSD 5.6e-6 -> 1.9e-6 from
        # float64 with fp64 running sums, reverse KL 4.8e-7 -> 3.5e-7.
        kl_pm = 0.0
        if SINGLE_BLOCK:
            q, h, pm = _centred_terms(s, t, c, lse2_s, lse2_t, log2_beta, log2_1mb, DIVERGENCE)
            sq, sqh, bqh, bq = _centred_sums(q, h)
            sum0 = tl.sum(sq, axis=0)
            sum1 = tl.sum(sqh, axis=0)
            sum2 = tl.sum(bqh, axis=0)
            sum3 = tl.sum(bq, axis=0)
            if DIVERGENCE == _JSD:
                kl_pm = tl.sum(pm, axis=0)
        if HAS_SUMS:
            sum0, sum1, sum2, sum3 = _external_row_sums(sums_ptr, DIVERGENCE)
        elif not SINGLE_BLOCK:
            sum0, sum1, sum2, sum3 = _row_sums_whole_row(s_base, t_base, lead, V, c, lse2_s, lse2_t, log2_beta,
                                                         log2_1mb, xo, DIVERGENCE, BLOCK, PEEL, OPTS)
        k0, k1, k2, k3, sums_value = _grad_constants(sum0, sum1, sum2, sum3, beta, DIVERGENCE)
        if SINGLE_BLOCK:
            write_grad(g_row, cols, V, g_width, s, _centre(q, h, k0, k1, k2, k3), gdiv, label, lse2_r, gh, xo, CE,
                       OPTS)
        else:
            kl_pm, sum_s, e_p, e_q = _write_grad_sweep_stats(s_base, t_base, g_base, lead, 0, g_width + lead, V,
                                                             g_width, label, c, lse2_s, lse2_t, log2_beta, log2_1mb,
                                                             k0, k1, k2, k3, gdiv, lse2_r, gh, xo, DIVERGENCE, CE,
                                                             BLOCK, PEEL, OPTS, RETURN_STATS)
        D = _divergence_value(sums_value, kl_pm, beta, DIVERGENCE)

    if SINGLE_BLOCK:
        fill_row(g_row, BLOCK, g_width, 0.0, BLOCK)  # student columns past the block
    row_loss = div_weight * D
    if CE != 0:
        row_loss += hard_label_loss(lse2_r, s_label, sum_s, ce_weight, xo, CE_TERM, OPTS)
    tl.store(loss_ptr, row_loss)
    if RETURN_STATS:
        store_stats(stats_out, e_p * -LN2, e_q * -LN2, col_s == col_t, D, zero32())


@triton.jit
def kd_forward_kernel(
    S, T, G, LOSS, LABELS, GRAD_SCALE, STATS, SUMS,
    s_stride, t_stride, g_stride, V, g_width, s_lead, vocab_start,
    c, inv_temperature, temperature, beta, log2_beta, log2_1mb, div_weight, ce_weight, ignore_index,
    s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, CE: tl.constexpr, HAS_STATS: tl.constexpr,
    HAS_SUMS: tl.constexpr, SHARD: tl.constexpr,
    BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr, PEEL: tl.constexpr, OPTS: tl.constexpr,
    STATS_OUT, RETURN_STATS: tl.constexpr,
):
    """The fused forward of whole rows; SHARD: the vocab-parallel write_grad of one slice
    (labels are global ids, the slice starts at vocab_start, a label elsewhere is no error).
    s_mul .. z_loss: the logit options' scalars (rows.py: XO), read where OPTS says.
    RETURN_STATS: the per-token diagnostics into STATS_OUT [N, STATS_WIDTH] fp32 (None
    without: a constexpr, so the kernel compiles as before them)."""
    row = tl.program_id(0).to(tl.int64)
    s_row = row_base(S, row, s_stride)
    t_row = row_base(T, row, t_stride)
    g_row = row_base(G, row, g_stride)
    lead = row_lead(s_lead, row, s_stride, PEEL)  # one lead for s, t and g (launch.peel_columns)
    stats_row = STATS + row * _ROW_STATS_WIDTH
    sums_row = SUMS + row * _ROW_SUMS_WIDTH
    xo = (s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss)
    if RETURN_STATS:
        stats_out = STATS_OUT + row * _STATS_WIDTH
    else:
        stats_out = STATS_OUT  # None
    scale = tl.load(GRAD_SCALE).to(tl.float32)
    gdiv = scale * div_weight * inv_temperature
    gce = scale * ce_weight
    if HAS_LABELS:
        label = tl.load(LABELS + row)
        ignored = label == ignore_index
        if SHARD:  # a label outside this slice is another slice's: -1, no one-hot here
            local = label - vocab_start
            label = tl.where((local < 0) | (local >= V), -1, local)
            marked = ignored
        else:
            marked = ignored | (label < 0) | (label >= V)
        if marked:
            # Ignored: out of every term. Out of range: NaN marks the row, never a number.
            fill = tl.where(ignored, 0.0, float("nan"))
            tl.store(LOSS + row, fill)
            fill_row(g_row, 0, g_width, fill, BLOCK)
            if RETURN_STATS:
                store_blank_stats(stats_out)
        else:
            _kd_row(s_row, t_row, g_row, lead, LOSS + row, stats_row, sums_row, label, V, g_width,
                    c, inv_temperature, temperature, beta, log2_beta, log2_1mb, div_weight, ce_weight, gdiv, gce,
                    scale, xo, DIVERGENCE, CE, HAS_STATS, HAS_SUMS, BLOCK, SINGLE_BLOCK, PEEL, OPTS,
                    stats_out, RETURN_STATS)
    else:
        _kd_row(s_row, t_row, g_row, lead, LOSS + row, stats_row, sums_row, -1, V, g_width,
                c, inv_temperature, temperature, beta, log2_beta, log2_1mb, div_weight, ce_weight, gdiv, gce,
                scale, xo, DIVERGENCE, CE, HAS_STATS, HAS_SUMS, BLOCK, SINGLE_BLOCK, PEEL, OPTS,
                stats_out, RETURN_STATS)


@triton.jit
def row_stats_kernel(S, T, OUT, s_stride, t_stride, V, s_lead, c, inv_temperature, temperature,
                     s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss,
                     RAW: tl.constexpr, BLOCK: tl.constexpr, PEEL: tl.constexpr, OPTS: tl.constexpr):
    """[N, ROW_STATS_WIDTH] row_stats for a vocab-parallel caller: (max_s, sum_s, max_t, sum_t,
    sum_raw), of the transformed logits s' and t' (OPTS, rows.py).

    RAW: CE_NONE (sum_raw = 0), CE_SHARED (T == 1: sum_raw = sum_s) or CE_RAW (T != 1).
    """
    row = tl.program_id(0).to(tl.int64)
    lead = row_lead(s_lead, row, s_stride, PEEL)
    xo = (s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss)
    m_s, z_s, m_t, z_t, z_r = row_stats_sweep(aligned_base(row_base(S, row, s_stride), lead, PEEL),
                                              aligned_base(row_base(T, row, t_stride), lead, PEEL), lead, 0, V + lead,
                                              V, c, inv_temperature, temperature, xo, BLOCK, RAW == _CE_RAW, PEEL,
                                              OPTS)
    if RAW == _CE_SHARED:
        z_r = z_s
    out = OUT + row * _ROW_STATS_WIDTH
    tl.store(out + 0, m_s * inv_temperature)
    tl.store(out + 1, z_s)
    tl.store(out + 2, m_t * inv_temperature)
    tl.store(out + 3, z_t)
    tl.store(out + 4, z_r)


# ---------------------------------------------------------------------------------------
# Launchers.

def _log2_or_ninf(x: float) -> float:
    return math.log2(x) if x > 0.0 else float("-inf")


def kernel_scalars(inv_temperature: float, beta: float):
    """(c, 1/T, T, log2 beta, log2(1-beta)) as the kernel receives them, all fp32-rounded by triton."""
    inv_t = float(inv_temperature)
    return (1.4426950408889634 * inv_t, inv_t, 1.0 / inv_t, _log2_or_ninf(beta), _log2_or_ninf(1.0 - beta))


def _launch_forward(student, teacher, labels, grad_scale, row_stats, k: KernelSettings, grad, row_sums=None,
                    vocab_start=None, stats_out=None):
    """The forward kernel; with vocab_start, the vocab-parallel write_grad of one slice
    (row_stats and, for reverse_kl/jsd/tvd, row_sums from the caller); with stats_out
    ([N, STATS_WIDTH] fp32), the per-token diagnostics written into it as well."""
    n = student.shape[0]
    loss = torch.empty((n,), dtype=torch.float32, device=student.device)
    if n == 0:
        return loss
    # JSD at beta 0 / 1 is forward / reverse KL; resolved here as well as in Python, since
    # under torch.compile beta may have been a traced value there.
    divergence = resolve_divergence(k.divergence, k.beta)
    opts, xo = logit_options(k)
    cfg = launch_config(k.vocab_size, student.dtype, teacher.dtype, divergence, launch.BLOCK_OVERRIDE, opts != 0,
                        stats_out is not None)
    peel = 0 if cfg.single_block else peel_columns(k.vocab_size, divergence, student, teacher, grad)
    c, inv_t, temp, log2_beta, log2_1mb = kernel_scalars(k.inv_temperature, k.beta)
    # Few rows at a large V: the vocabulary split across programs (split.py). A caller's
    # row_stats take the one-program kernel (the split path reads the label's logit in its
    # own row_stats pass, before the in-place write).
    split = vocab_splits(n, k.vocab_size, cfg, launch.SPLIT_OVERRIDE) if row_stats is None else None
    if split is not None and split.splits > 1:
        from . import split as split_path  # it builds on this module's kernels

        return split_path.launch(student, teacher, labels, grad_scale, grad, k, divergence, cfg, split, peel,
                                 base_lead(student, peel), (c, inv_t, temp, log2_beta, log2_1mb), ce_mode(k),
                                 opts, xo, stats_out)
    with kernel_launch(student.device):
        kd_forward_kernel[(n,)](
            student, teacher, grad, loss,
            labels if labels is not None else loss,  # unused pointer when there are no labels
            grad_scale,
            row_stats if row_stats is not None else loss,
            row_sums if row_sums is not None else loss,
            student.stride(0), teacher.stride(0), grad.stride(0), k.vocab_size, grad.shape[1],
            base_lead(student, peel), 0 if vocab_start is None else int(vocab_start),
            c, inv_t, temp, float(k.beta), log2_beta, log2_1mb, float(k.div_weight), float(k.ce_weight),
            int(k.ignore_index), *xo,
            DIVERGENCE=DIVERGENCE_IDS[divergence], HAS_LABELS=labels is not None,
            CE=ce_mode(k), HAS_STATS=row_stats is not None,
            HAS_SUMS=row_sums is not None, SHARD=vocab_start is not None,
            BLOCK=cfg.block, SINGLE_BLOCK=cfg.single_block, PEEL=peel, OPTS=opts,
            STATS_OUT=stats_out, RETURN_STATS=stats_out is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return loss


def forward(student, teacher, labels, grad_scale, row_stats, k: KernelSettings):
    """(loss [N] fp32, grad) with the gradient in a new tensor of the student's dtype."""
    check_operator_args(student, teacher, labels, grad_scale, row_stats, k, SUPPORTED_DTYPES)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    return _launch_forward(student, teacher, labels, grad_scale, row_stats, k, grad), grad


def forward_inplace(student, teacher, labels, grad_scale, row_stats, k: KernelSettings):
    """loss [N] fp32, the gradient written over ``student``."""
    check_operator_args(student, teacher, labels, grad_scale, row_stats, k, SUPPORTED_DTYPES)
    # Each program reads its row (and the label's logit) before writing the gradient over it.
    return _launch_forward(student, teacher, labels, grad_scale, row_stats, k, student)


def _stats_table(student):
    return torch.empty((student.shape[0], STATS_WIDTH), dtype=torch.float32, device=student.device)


def forward_stats(student, teacher, labels, grad_scale, k: KernelSettings):
    """(loss [N] fp32, grad, stats [N, STATS_WIDTH] fp32): ``forward`` with the per-token
    diagnostics from the same pass (fastkd/backends/__init__.py: the stats table)."""
    check_operator_args(student, teacher, labels, grad_scale, None, k, SUPPORTED_DTYPES)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    stats = _stats_table(student)
    return _launch_forward(student, teacher, labels, grad_scale, None, k, grad, stats_out=stats), grad, stats


def forward_stats_inplace(student, teacher, labels, grad_scale, k: KernelSettings):
    """(loss [N] fp32, stats): ``forward_inplace`` with the per-token diagnostics; each
    program reads what they need of its row before writing the gradient over it."""
    check_operator_args(student, teacher, labels, grad_scale, None, k, SUPPORTED_DTYPES)
    stats = _stats_table(student)
    return _launch_forward(student, teacher, labels, grad_scale, None, k, student, stats_out=stats), stats


def row_stats(student, teacher, k: KernelSettings):
    """[N, ROW_STATS_WIDTH] float32 row_stats of both sides' transformed logits (the row_stats
    kernel); the T = 1 column only when the CE term or the z-loss is on."""
    check_operator_args(student, teacher, None, None, None, k, SUPPORTED_DTYPES)
    n = student.shape[0]
    out = torch.empty((n, ROW_STATS_WIDTH), dtype=torch.float32, device=student.device)
    if n == 0:
        return out
    block = min(triton.next_power_of_2(k.vocab_size), launch.BLOCK_OVERRIDE or launch.MULTI_BLOCK)
    c, inv_t, temp, _, _ = kernel_scalars(k.inv_temperature, 0.5)
    peel = peel_columns(k.vocab_size, None, student, teacher)
    opts, xo = logit_options(k, transforms_only=True)
    with kernel_launch(student.device):
        row_stats_kernel[(n,)](student, teacher, out, student.stride(0), teacher.stride(0), k.vocab_size,
                               base_lead(student, peel), c, inv_t, temp, *xo, RAW=ce_mode(k), BLOCK=block, PEEL=peel,
                               OPTS=opts, num_warps=warps_for(block))
    return out
