"""Fused knowledge-distillation loss and gradient in Triton: one program per token (row).

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
1/denominator, read from device memory). The semantics, including every guard, are those
of the C++ CPU kernel (csrc/cpu/kd_cpu.cpp), which this file mirrors:

* Logarithms are kept in base 2: with c = log2(e)/T, x = s*c is s/T in bits, so every
  exponential is one exp2 of one FMA (``exp2(s*c - lse2)``), and log q = (x - lse2) ln 2.
* Row statistics (max and sum-exp of *both* sides, plus the T=1 sum-exp of s for the CE
  term when T != 1) come from one read of the row: an online softmax whose running sums
  are per-lane vectors rescaled by a scalar when the block max moves.
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

Two kernel shapes, chosen per V by :func:`launch_config`:

* single block (V <= the divergence's register budget): the whole row of s and t is
  loaded once into registers; statistics, divergence, gradient are computed from them.
  Traffic: one read of s and t, one write of ds (the floor).
* multi block: sweep 1 reads the row for the statistics; forward_kl then reads it once
  more and writes the gradient (2 reads); reverse_kl/jsd/tvd need a row sum (sum q h or
  the side masses) before any gradient entry is known, so they read it a second time for
  the sums and a third time to write.

Offsets are int64 (row * stride) so N*V > 2^31 works. ``scale_grad_`` (backward) reads
grad_output on the device and returns without touching memory when it is exactly 1: no
host synchronisation anywhere, so CUDA graphs and torch.compile keep working.

On the CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before
triton is imported); everything is cast to fp32 right after loading.
"""
import contextlib
import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._args import resolve_divergence
from .ops import KernelBackend, fake_forward, fake_forward_inplace, fake_row_stats, fake_scale_grad_


def _interpreting() -> bool:
    """Whether @triton.jit builds interpreter objects (decided now, at import, as triton does)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.3
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_INTERPRETED = tl.constexpr(_interpreting())
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

DIVERGENCE_IDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3}
_FORWARD_KL = tl.constexpr(DIVERGENCE_IDS["forward_kl"])
_JSD = tl.constexpr(DIVERGENCE_IDS["jsd"])
_TVD = tl.constexpr(DIVERGENCE_IDS["tvd"])  # reverse_kl: the remaining case

# CE modes (constexpr): no CE term; CE at T == 1 (its softmax is the student's own, so the
# statistics are shared); CE at T != 1 (a third running sum-exp, of the raw logits).
CE_NONE, CE_SHARED, CE_RAW = 0, 1, 2

ROW_STATS_WIDTH = 5  # (max_s, sumexp_s, max_t, sumexp_t, sumexp_raw), maxes in s/T units
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------
# Launch decisions, in one place.

MAX_BLOCK = 16384  # columns per tensor per block

# Largest power-of-two row kept whole in registers, per divergence. At 8 values of each
# tensor per thread (1024 threads hold 8192 columns) every divergence fits without
# spilling; forward_kl (s, t, then q - p: no row sum between the loads and the write)
# also fits 16 per thread at the 64-register cap of 1024 threads. The centred
# divergences at 16384 spill (q, h and log m live across two row reductions). Checked
# for sm_90 by tests/test_triton_compile.py.
SINGLE_BLOCK_MAX = {"forward_kl": 16384, "reverse_kl": 8192, "jsd": 8192, "tvd": 8192}

# Columns per loop iteration in the multi-block sweeps: 8 per thread at 8 warps. ptxas
# aims at 64 registers here (four programs per SM); at 4096 columns x 16 warps the fp32
# sweeps spill to reach it, at 16 per thread they need ~120 (one program per SM).
MULTI_BLOCK = 2048

# Tests force small blocks (the multi-block path at V ~ 1000 under the interpreter).
BLOCK_OVERRIDE: Optional[int] = None


@dataclass(frozen=True)
class LaunchConfig:
    block: int           # columns of each tensor per block (power of two, <= MAX_BLOCK)
    single_block: bool   # the whole row lives in registers (one read of s and t)
    num_warps: int
    num_stages: int = 1  # the sweeps stream; no shared-memory pipelining of plain loads


def launch_config(vocab_size: int, student_dtype: torch.dtype, teacher_dtype: torch.dtype,
                  divergence: str, block_override: Optional[int] = None) -> LaunchConfig:
    """Block size, path and warps for one row of ``vocab_size`` columns.

    Eight fp32 values of each tensor per thread (two 16-byte loads of fp32, one of 16-bit
    data), sixteen only for forward_kl's 16384-column single block (32 warps is the most
    a program can have). Not yet tuned on a GPU: this is the one function to tune.
    """
    del student_dtype, teacher_dtype  # loads are cast to fp32 at once; the budget is fp32
    if block_override is not None:
        block = min(triton.next_power_of_2(int(block_override)), MAX_BLOCK)
        single = triton.next_power_of_2(vocab_size) <= block
        if single:
            block = triton.next_power_of_2(vocab_size)
        return LaunchConfig(block, single, _warps_for(block))
    full = triton.next_power_of_2(vocab_size)
    if full <= SINGLE_BLOCK_MAX[divergence]:
        return LaunchConfig(full, True, _warps_for(full))
    return LaunchConfig(MULTI_BLOCK, False, _warps_for(MULTI_BLOCK))


def _warps_for(block: int) -> int:
    """Warps for a block: 8 columns per thread, 4 to 32 warps."""
    return max(4, min(32, block // 256))


def _config_probe_vocab_sizes() -> Iterator[int]:
    """Vocabulary sizes that reach every configuration launch_config can return."""
    v = 1
    while v <= 4 * MAX_BLOCK:
        yield v
        v *= 2
    yield 128256  # and a realistic LLM vocabulary


def config_classes():
    """The distinct kernel configurations the launcher can pick, a worst case of each class.

    A class is (divergence, path, num_warps); its worst case for registers is its largest
    block, and the smallest block of a class (tiny vocabularies: fewer columns than
    threads) is listed too when it differs. Returns [(divergence, LaunchConfig, vocab)],
    used by the sm_90 compile check so that it follows this function, not a copied list.
    """
    largest, smallest = {}, {}
    for divergence in DIVERGENCE_IDS:
        for v in _config_probe_vocab_sizes():
            cfg = launch_config(v, torch.bfloat16, torch.bfloat16, divergence)
            key = (divergence, cfg.single_block, cfg.num_warps)
            if key not in largest or cfg.block > largest[key][1].block:
                largest[key] = (divergence, cfg, v)
            if key not in smallest or cfg.block < smallest[key][1].block:
                smallest[key] = (divergence, cfg, v)
    out = list(largest.values())
    out += [entry for key, entry in smallest.items() if entry[1] != largest[key][1]]
    return out


# ---------------------------------------------------------------------------------------
# Shared row machinery: loads, anchors, statistics.

@triton.jit
def _row_offset(row, stride):
    # int64 before the multiply: row * stride exceeds 2^31 at 16384 x 151936.
    return row.to(tl.int64) * stride


@triton.jit
def _row_base(ptr, row, stride):
    return ptr + _row_offset(row, stride)


@triton.jit
def _load_pair(s_row, t_row, cols, V):
    # Columns past V read as -inf: zero probability, nothing added to any sum. Cast to fp32
    # right after loading (the interpreter keeps bf16 as raw bits).
    live = cols < V
    s = tl.load(s_row + cols, mask=live, other=float("-inf")).to(tl.float32)
    t = tl.load(t_row + cols, mask=live, other=float("-inf")).to(tl.float32)
    return s, t


@triton.jit
def _anchor(a):
    # exp2 anchor (in bits); a row whose max is still -inf is all -inf (zero mass): anchor
    # at 0, since exp2(-inf - -inf) would be NaN.
    return tl.where(a == float("-inf"), 0.0, a)


@triton.jit
def _anchors(m_s, m_t, inv_temperature, temperature):
    """Anchors (bits) of the student, teacher and raw-student exponentials for raw maxes.

    Rounded exactly as from external row_stats (maxes in s/T units): A = (m/T) * log2(e).
    """
    ms_nat = m_s * inv_temperature
    a_s = ms_nat * _LOG2E
    a_t = (m_t * inv_temperature) * _LOG2E
    a_r = (temperature * ms_nat) * _LOG2E
    return a_s, a_t, a_r


@triton.jit
def _row_stats_sweep(s_row, t_row, V, c, inv_temperature, temperature,
                     BLOCK: tl.constexpr, RAW: tl.constexpr):
    """Sweep 1: max and sum-exp of s/T and t/T (and of s, when RAW) in one read of the row.

    Returns raw maxes (logit units) and sums anchored as in :func:`_anchors`. The sums are
    per-lane vectors, rescaled by one scalar factor when the block max moves: one exp2
    per element per side, one cross-warp reduction (the max) per block.
    """
    cols = tl.arange(0, BLOCK)
    m_s = float("-inf")
    m_t = float("-inf")
    a_s = float("-inf")
    a_t = float("-inf")
    a_r = float("-inf")
    z_s = tl.zeros([BLOCK], dtype=tl.float32)
    z_t = tl.zeros([BLOCK], dtype=tl.float32)
    z_r = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        s, t = _load_pair(s_row, t_row, start + cols, V)
        m_s = tl.maximum(m_s, tl.max(s, axis=0))
        m_t = tl.maximum(m_t, tl.max(t, axis=0))
        n_s, n_t, n_r = _anchors(m_s, m_t, inv_temperature, temperature)
        # exp2(old - new) is 0 while the old anchor is -inf, 1 when the max did not move.
        z_s = z_s * tl.exp2(a_s - _anchor(n_s)) + tl.exp2(s * c - _anchor(n_s))
        z_t = z_t * tl.exp2(a_t - _anchor(n_t)) + tl.exp2(t * c - _anchor(n_t))
        if RAW:
            z_r = z_r * tl.exp2(a_r - _anchor(n_r)) + tl.exp2(s * _LOG2E - _anchor(n_r))
        a_s, a_t, a_r = n_s, n_t, n_r
    return m_s, tl.sum(z_s, axis=0), m_t, tl.sum(z_t, axis=0), tl.sum(z_r, axis=0)


@triton.jit
def _block_stats(s, t, c, inv_temperature, temperature, RAW: tl.constexpr):
    """Row statistics of a row already in registers (single-block path), as the sweep."""
    m_s = tl.max(s, axis=0)
    m_t = tl.max(t, axis=0)
    a_s, a_t, a_r = _anchors(m_s, m_t, inv_temperature, temperature)
    z_s = tl.sum(tl.exp2(s * c - _anchor(a_s)), axis=0)
    z_t = tl.sum(tl.exp2(t * c - _anchor(a_t)), axis=0)
    z_r = 0.0
    if RAW:
        z_r = tl.sum(tl.exp2(s * _LOG2E - _anchor(a_r)), axis=0)
    return m_s, z_s, m_t, z_t, z_r


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
    log1p2 = tl.where(ym1 == 0.0, e * _LOG2E, tl.log2(y) * (e / ym1))
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

    Measured under the interpreter against float64 (tests/cases.py LARGE_VOCAB_CENTRED:
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
def _zero64():
    return tl.full((), 0.0, tl.float64)


@triton.jit
def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _sum4(a, b, c, d):
    """Four block sums. Compiled, one joint reduction: one round of shuffles and one
    barrier instead of four. The interpreter runs a custom-combine reduction element by
    element in Python (ten times slower than the whole kernel), so there: four tl.sum."""
    if _INTERPRETED:
        return tl.sum(a, axis=0), tl.sum(b, axis=0), tl.sum(c, axis=0), tl.sum(d, axis=0)
    else:
        return tl.reduce((a, b, c, d), 0, _add4)


@triton.jit
def _write_grad(g_row, cols, V, g_width, s, w, gdiv, label, lse2_raw, gce, CE: tl.constexpr):
    """ds = gdiv * dD/d(s/T) (+ gce * (softmax(s) - onehot)), 0 past V, in the student dtype."""
    g = gdiv * w
    if CE != 0:
        sm = tl.exp2(s * _LOG2E - lse2_raw)
        # The one-hot part is added in fp32, so the label entry is rounded once.
        g += gce * tl.where(cols == label, sm - 1.0, sm)
    g = tl.where(cols < V, g, 0.0)
    tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=cols < g_width)


@triton.jit
def _fill_row(g_row, start, g_width, value, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    fill = tl.zeros([BLOCK], dtype=tl.float32) + value
    for off in range(start, g_width, BLOCK):
        tl.store(g_row + off + cols, fill.to(g_row.dtype.element_ty), mask=off + cols < g_width)


# ---------------------------------------------------------------------------------------
# The forward kernel.

@triton.jit
def _kd_row(s_row, t_row, g_row, loss_ptr, stats_ptr, label, V, g_width,
            c, inv_temperature, temperature, beta, log2_beta, log2_1mb,
            div_weight, ce_weight, gdiv, gce,
            DIVERGENCE: tl.constexpr, CE: tl.constexpr, HAS_STATS: tl.constexpr,
            BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    s_label = 0.0
    if CE != 0:
        s_label = tl.load(s_row + label).to(tl.float32)  # before an in-place write over it
    if SINGLE_BLOCK:
        s, t = _load_pair(s_row, t_row, cols, V)

    # Row statistics: raw maxes (or s/T-unit maxes from the caller) and anchored sums.
    if HAS_STATS:
        ms_nat = tl.load(stats_ptr + 0)
        z_s = tl.load(stats_ptr + 1)
        mt_nat = tl.load(stats_ptr + 2)
        z_t = tl.load(stats_ptr + 3)
        z_r = tl.load(stats_ptr + 4)
        a_s = ms_nat * _LOG2E
        a_t = mt_nat * _LOG2E
        a_r = (temperature * ms_nat) * _LOG2E
    else:
        if SINGLE_BLOCK:
            m_s, z_s, m_t, z_t, z_r = _block_stats(s, t, c, inv_temperature, temperature, CE == 2)
        else:
            m_s, z_s, m_t, z_t, z_r = _row_stats_sweep(s_row, t_row, V, c, inv_temperature, temperature,
                                                       BLOCK, CE == 2)
        a_s, a_t, a_r = _anchors(m_s, m_t, inv_temperature, temperature)
    if CE == 1:  # T == 1: the CE softmax is the student's own
        z_r = z_s
        a_r = a_s
    lse2_s = _anchor(a_s) + tl.log2(z_s)
    lse2_t = _anchor(a_t) + tl.log2(z_t)
    lse2_r = 0.0
    if CE != 0:
        lse2_r = _anchor(a_r) + tl.log2(z_r)

    if DIVERGENCE == _FORWARD_KL:
        if SINGLE_BLOCK:
            d, w = _forward_kl_terms(s, t, c, lse2_s, lse2_t)
            _write_grad(g_row, cols, V, g_width, s, w, gdiv, label, lse2_r, gce, CE)
            D = tl.sum(d, axis=0)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, g_width, BLOCK):
                s, t = _load_pair(s_row, t_row, start + cols, V)
                d, w = _forward_kl_terms(s, t, c, lse2_s, lse2_t)
                acc += d
                _write_grad(g_row, start + cols, V, g_width, s, w, gdiv, label, lse2_r, gce, CE)
            D = tl.sum(acc, axis=0)
        D = D * _LN2
    elif DIVERGENCE == _TVD:
        if SINGLE_BLOCK:
            q, diff, half_abs, pos, neg, tie = _tvd_terms(s, t, c, lse2_s, lse2_t)
            D = tl.sum(half_abs, axis=0)
            q_pos = tl.sum(pos, axis=0)
            q_neg = tl.sum(neg, axis=0)
            q_tie = tl.sum(tie, axis=0)
        else:
            # Scalar running sums, the four block sums in one joint reduction: vector
            # accumulators would cost 4 x 8 registers on top of the divergence math.
            D = 0.0
            q_pos = 0.0
            q_neg = 0.0
            q_tie = 0.0
            for start in range(0, V, BLOCK):
                s2, t2 = _load_pair(s_row, t_row, start + cols, V)
                q2, diff2, half_abs2, pos2, neg2, tie2 = _tvd_terms(s2, t2, c, lse2_s, lse2_t)
                b_d, b_pos, b_neg, b_tie = _sum4(half_abs2, pos2, neg2, tie2)
                D += b_d
                q_pos += b_pos
                q_neg += b_neg
                q_tie += b_tie
        # h_i - sum_j q_j h_j = sum_j q_j (h_i - h_j): masses on the other sides, exact.
        # D <= 1 is finite, so D - D is 0 unless the row holds a NaN, which the sign
        # comparisons would otherwise drop from the gradient.
        nan_or_zero = D - D
        g_pos = q_neg + 0.5 * q_tie + nan_or_zero
        g_neg = -(q_pos + 0.5 * q_tie) + nan_or_zero
        g_tie = 0.5 * (q_neg - q_pos) + nan_or_zero
        if SINGLE_BLOCK:
            _write_grad(g_row, cols, V, g_width, s, _tvd_grad(q, diff, g_pos, g_neg, g_tie), gdiv, label, lse2_r,
                        gce, CE)
        else:
            for start in range(0, g_width, BLOCK):
                s, t = _load_pair(s_row, t_row, start + cols, V)
                q, diff, half_abs, pos, neg, tie = _tvd_terms(s, t, c, lse2_s, lse2_t)
                _write_grad(g_row, start + cols, V, g_width, s, _tvd_grad(q, diff, g_pos, g_neg, g_tie), gdiv,
                            label, lse2_r, gce, CE)
    else:  # reverse_kl, jsd: dD/d(s/T) = scale q (h - sum q h)
        if DIVERGENCE == _JSD:
            scale = (1.0 - beta) * _LN2
        else:
            scale = _LN2
        # Row sums: a tree within a block (tl.sum / tl.reduce: a few in-thread adds, then
        # shuffles), and across the blocks of a row (16 at V = 32000, 128 at 262144) fp64
        # running sums, one fp64 add per sum per block. Measured under the interpreter, fp32,
        # V = 128256, T = 1 (with the normalised centring): JSD 5.6e-6 -> 1.9e-6 from
        # float64 with fp64 running sums, reverse KL 4.8e-7 -> 3.5e-7.
        kl_pm = 0.0
        if SINGLE_BLOCK:
            q, h, pm = _centred_terms(s, t, c, lse2_s, lse2_t, log2_beta, log2_1mb, DIVERGENCE)
            sq, sqh, bqh, bq = _centred_sums(q, h)
            small_q = tl.sum(sq, axis=0)
            small_qh = tl.sum(sqh, axis=0)
            big_qh = tl.sum(bqh, axis=0)
            big_q = tl.sum(bq, axis=0)
            if DIVERGENCE == _JSD:
                kl_pm = tl.sum(pm, axis=0)
        else:
            small_q = _zero64()
            small_qh = _zero64()
            big_qh = _zero64()
            big_q = _zero64()
            for start in range(0, V, BLOCK):
                s2, t2 = _load_pair(s_row, t_row, start + cols, V)
                q2, h2, pm2 = _centred_terms(s2, t2, c, lse2_s, lse2_t, log2_beta, log2_1mb, DIVERGENCE)
                sq2, sqh2, bqh2, bq2 = _centred_sums(q2, h2)
                b_sq, b_sqh, b_bqh, b_bq = _sum4(sq2, sqh2, bqh2, bq2)
                small_q += b_sq.to(tl.float64)
                small_qh += b_sqh.to(tl.float64)
                big_qh += b_bqh.to(tl.float64)
                big_q += b_bq.to(tl.float64)
        h_mean, small_q_n, small_qh_n, qh = _centring(small_q, small_qh, big_qh, big_q)
        if SINGLE_BLOCK:
            _write_grad(g_row, cols, V, g_width, s, _centre(q, h, small_q_n, small_qh_n, h_mean, scale), gdiv, label,
                        lse2_r, gce, CE)
        else:
            # JSD's sum p (log p - log m) (the loss only) is taken here, one block sum per
            # block: as a fifth sum of the sums sweep it took the 16-bit build from 64 to 70
            # registers (a 4-byte spill under the CUDA toolkit's ptxas).
            for start in range(0, g_width, BLOCK):
                s, t = _load_pair(s_row, t_row, start + cols, V)
                q, h, pm = _centred_terms(s, t, c, lse2_s, lse2_t, log2_beta, log2_1mb, DIVERGENCE)
                if DIVERGENCE == _JSD:
                    kl_pm += tl.sum(pm, axis=0)
                _write_grad(g_row, start + cols, V, g_width, s, _centre(q, h, small_q_n, small_qh_n, h_mean, scale),
                            gdiv, label, lse2_r, gce, CE)
        if DIVERGENCE == _JSD:
            D = (beta * kl_pm + (1.0 - beta) * qh) * _LN2
        else:
            D = qh * _LN2

    if SINGLE_BLOCK:
        _fill_row(g_row, BLOCK, g_width, 0.0, BLOCK)  # student columns past the block
    row_loss = div_weight * D
    if CE != 0:
        row_loss += ce_weight * (lse2_r * _LN2 - s_label)
    tl.store(loss_ptr, row_loss)


@triton.jit
def _kd_forward_kernel(
    S, T, G, LOSS, LABELS, GRAD_SCALE, STATS,
    s_stride, t_stride, g_stride, V, g_width,
    c, inv_temperature, temperature, beta, log2_beta, log2_1mb, div_weight, ce_weight, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, CE: tl.constexpr, HAS_STATS: tl.constexpr,
    BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = _row_base(S, row, s_stride)
    t_row = _row_base(T, row, t_stride)
    g_row = _row_base(G, row, g_stride)
    stats_row = STATS + row * 5
    scale = tl.load(GRAD_SCALE).to(tl.float32)
    gdiv = scale * div_weight * inv_temperature
    gce = scale * ce_weight
    if HAS_LABELS:
        label = tl.load(LABELS + row)
        ignored = label == ignore_index
        if ignored | (label < 0) | (label >= V):
            # Ignored: out of every term. Out of range: NaN marks the row, never a number.
            fill = tl.where(ignored, 0.0, float("nan"))
            tl.store(LOSS + row, fill)
            _fill_row(g_row, 0, g_width, fill, BLOCK)
        else:
            _kd_row(s_row, t_row, g_row, LOSS + row, stats_row, label, V, g_width,
                    c, inv_temperature, temperature, beta, log2_beta, log2_1mb, div_weight, ce_weight, gdiv, gce,
                    DIVERGENCE, CE, HAS_STATS, BLOCK, SINGLE_BLOCK)
    else:
        _kd_row(s_row, t_row, g_row, LOSS + row, stats_row, -1, V, g_width,
                c, inv_temperature, temperature, beta, log2_beta, log2_1mb, div_weight, ce_weight, gdiv, gce,
                DIVERGENCE, CE, HAS_STATS, BLOCK, SINGLE_BLOCK)


@triton.jit
def _row_stats_kernel(S, T, OUT, s_stride, t_stride, V, c, inv_temperature, temperature,
                      RAW: tl.constexpr, BLOCK: tl.constexpr):
    """[N, 5] row statistics for a vocab-parallel caller: (max_s, sum_s, max_t, sum_t, sum_raw).

    RAW: 0 no CE (sum_raw = 0), 1 CE at T == 1 (sum_raw = sum_s), 2 CE at T != 1.
    """
    row = tl.program_id(0).to(tl.int64)
    m_s, z_s, m_t, z_t, z_r = _row_stats_sweep(_row_base(S, row, s_stride), _row_base(T, row, t_stride), V, c,
                                               inv_temperature, temperature, BLOCK, RAW == 2)
    if RAW == 1:
        z_r = z_s
    out = OUT + row * 5
    tl.store(out + 0, m_s * inv_temperature)
    tl.store(out + 1, z_s)
    tl.store(out + 2, m_t * inv_temperature)
    tl.store(out + 3, z_t)
    tl.store(out + 4, z_r)


@triton.jit
def _scale_grad_kernel(G, GO, g_stride, go_stride, width, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """grad[row] *= grad_output (scalar, or one value per row); nothing is touched where it is 1."""
    row = tl.program_id(0).to(tl.int64)
    if PER_ROW:
        go = tl.load(GO + row * go_stride).to(tl.float32)
    else:
        go = tl.load(GO).to(tl.float32)
    if go != 1.0:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ptrs = _row_base(G, row, g_stride) + cols
        g = tl.load(ptrs, mask=cols < width).to(tl.float32)
        tl.store(ptrs, (g * go).to(G.dtype.element_ty), mask=cols < width)


# ---------------------------------------------------------------------------------------
# Launchers.

def _check_forward_args(student, teacher, labels, grad_scale, row_stats, divergence, inv_temperature, beta,
                        ce_weight, vocab_size):
    """The operator contract (the Python layer has already validated user input)."""
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"fastkd: student and teacher must be 2-D [N, V] with equal N, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.device != teacher.device:
        raise ValueError("fastkd: student and teacher are on different devices")
    if student.stride(1) != 1 or teacher.stride(1) != 1:
        raise ValueError("fastkd: logits need unit stride along the vocabulary")
    if student.dtype not in SUPPORTED_DTYPES or teacher.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fastkd: the triton backend takes float32/bfloat16/float16 logits, got "
                        f"{student.dtype} and {teacher.dtype}")
    if not 1 <= vocab_size <= min(student.shape[1], teacher.shape[1]):
        raise ValueError(f"fastkd: vocab_size {vocab_size} must be in [1, min({student.shape[1]}, "
                         f"{teacher.shape[1]})]")
    if divergence not in DIVERGENCE_IDS:
        raise ValueError(f"fastkd: unknown divergence {divergence!r}")
    if not inv_temperature > 0.0:
        raise ValueError("fastkd: inv_temperature must be > 0")
    if not 0.0 <= beta <= 1.0:
        raise ValueError("fastkd: beta must be in [0, 1]")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != student.shape[0] or labels.dtype != torch.int64
                               or not labels.is_contiguous() or labels.device != student.device):
        raise ValueError("fastkd: labels must be a contiguous int64 [N] tensor on the logits' device")
    if ce_weight != 0.0 and labels is None:
        raise ValueError("fastkd: ce_weight != 0 needs labels")
    if grad_scale.numel() != 1 or grad_scale.device != student.device:
        raise ValueError("fastkd: grad_scale must be a one-element tensor on the logits' device")
    if row_stats is not None and (tuple(row_stats.shape) != (student.shape[0], ROW_STATS_WIDTH)
                                  or row_stats.dtype != torch.float32 or not row_stats.is_contiguous()):
        raise ValueError(f"fastkd: row_stats must be a contiguous float32 [N, {ROW_STATS_WIDTH}] tensor")


def _ce_mode(ce_weight: float, inv_temperature: float) -> int:
    if ce_weight == 0.0:
        return CE_NONE
    return CE_SHARED if float(inv_temperature) == 1.0 else CE_RAW


def _log2_or_ninf(x: float) -> float:
    return math.log2(x) if x > 0.0 else float("-inf")


def kernel_scalars(inv_temperature: float, beta: float):
    """(c, 1/T, T, log2 beta, log2(1-beta)) as the kernel receives them, all fp32-rounded by triton."""
    inv_t = float(inv_temperature)
    return (1.4426950408889634 * inv_t, inv_t, 1.0 / inv_t, _log2_or_ninf(beta), _log2_or_ninf(1.0 - beta))


def _quiet_numpy():
    """Under the interpreter, numpy warns on the IEEE special values the kernels rely on
    (log2(0) = -inf, -inf - -inf = NaN behind a select); the GPU does not, neither do we."""
    if not kernels_interpreted():
        return contextlib.nullcontext()
    import numpy as np

    return np.errstate(all="ignore")


def _launch_forward(student, teacher, labels, grad_scale, row_stats, divergence, inv_temperature, beta,
                    div_weight, ce_weight, ignore_index, vocab_size, grad):
    n = student.shape[0]
    loss = torch.empty((n,), dtype=torch.float32, device=student.device)
    if n == 0:
        return loss
    # JSD at beta 0 / 1 is forward / reverse KL; resolved here as well as in Python, since
    # under torch.compile beta may have been a traced value there.
    divergence = resolve_divergence(divergence, beta)
    cfg = launch_config(vocab_size, student.dtype, teacher.dtype, divergence, BLOCK_OVERRIDE)
    c, inv_t, temp, log2_beta, log2_1mb = kernel_scalars(inv_temperature, beta)
    with _quiet_numpy():
        _kd_forward_kernel[(n,)](
            student, teacher, grad, loss,
            labels if labels is not None else loss,  # unused pointer when there are no labels
            grad_scale,
            row_stats if row_stats is not None else loss,
            student.stride(0), teacher.stride(0), grad.stride(0), vocab_size, grad.shape[1],
            c, inv_t, temp, float(beta), log2_beta, log2_1mb, float(div_weight), float(ce_weight), int(ignore_index),
            DIVERGENCE=DIVERGENCE_IDS[divergence], HAS_LABELS=labels is not None,
            CE=_ce_mode(ce_weight, inv_temperature), HAS_STATS=row_stats is not None,
            BLOCK=cfg.block, SINGLE_BLOCK=cfg.single_block,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return loss


SCALE_BLOCK = 4096


def _launch_scale_grad(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    if grad.numel() == 0:
        return
    if grad.dim() != 2 or grad.stride(1) != 1:
        raise ValueError("fastkd: grad must be 2-D with unit stride along the vocabulary")
    n, width = grad.shape
    per_row = grad_output.numel() != 1
    go = grad_output.reshape(-1)
    if per_row and go.shape[0] != n:
        raise ValueError(f"fastkd: grad_output must have 1 or {n} elements, got {go.shape[0]}")
    grid = (n, triton.cdiv(width, SCALE_BLOCK))
    with _quiet_numpy():  # the interpreter warns where a product overflows fp16 (inf, as on the GPU)
        _scale_grad_kernel[grid](grad, go, grad.stride(0), go.stride(0) if per_row else 0, width,
                                 PER_ROW=per_row, BLOCK=SCALE_BLOCK, num_warps=8)


def _launch_row_stats(student, teacher, inv_temperature, vocab_size, with_ce):
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError("fastkd: student and teacher must be 2-D [N, V] with equal N")
    if student.stride(1) != 1 or teacher.stride(1) != 1:
        raise ValueError("fastkd: logits need unit stride along the vocabulary")
    if not 1 <= vocab_size <= min(student.shape[1], teacher.shape[1]):
        raise ValueError(f"fastkd: vocab_size {vocab_size} out of range")
    n = student.shape[0]
    out = torch.empty((n, ROW_STATS_WIDTH), dtype=torch.float32, device=student.device)
    if n == 0:
        return out
    block = min(triton.next_power_of_2(vocab_size), BLOCK_OVERRIDE or MULTI_BLOCK)
    c, inv_t, temp, _, _ = kernel_scalars(inv_temperature, 0.5)
    raw = (CE_SHARED if inv_t == 1.0 else CE_RAW) if with_ce else CE_NONE
    with _quiet_numpy():
        _row_stats_kernel[(n,)](student, teacher, out, student.stride(0), teacher.stride(0), vocab_size, c, inv_t,
                                temp, RAW=raw, BLOCK=block, num_warps=_warps_for(block))
    return out


# ---------------------------------------------------------------------------------------
# torch.library operators (the backend contract of fastkd/ops.py) with fake implementations.

@torch.library.custom_op("fastkd::triton_kd_forward", mutates_args=())
def triton_kd_forward(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                      grad_scale: torch.Tensor, row_stats: Optional[torch.Tensor], divergence: str,
                      inv_temperature: float, beta: float, div_weight: float, ce_weight: float,
                      ignore_index: int, vocab_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_forward_args(student, teacher, labels, grad_scale, row_stats, divergence, inv_temperature, beta,
                        ce_weight, vocab_size)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    loss = _launch_forward(student, teacher, labels, grad_scale, row_stats, divergence, inv_temperature, beta,
                           div_weight, ce_weight, ignore_index, vocab_size, grad)
    return loss, grad


@torch.library.custom_op("fastkd::triton_kd_forward_inplace", mutates_args=("student",))
def triton_kd_forward_inplace(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                              grad_scale: torch.Tensor, row_stats: Optional[torch.Tensor], divergence: str,
                              inv_temperature: float, beta: float, div_weight: float, ce_weight: float,
                              ignore_index: int, vocab_size: int) -> torch.Tensor:
    _check_forward_args(student, teacher, labels, grad_scale, row_stats, divergence, inv_temperature, beta,
                        ce_weight, vocab_size)
    # Each program reads its row (and the label's logit) before writing the gradient over it.
    return _launch_forward(student, teacher, labels, grad_scale, row_stats, divergence, inv_temperature, beta,
                           div_weight, ce_weight, ignore_index, vocab_size, student)


@torch.library.custom_op("fastkd::triton_scale_grad_", mutates_args=("grad",))
def triton_scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    _launch_scale_grad(grad, grad_output)


@torch.library.custom_op("fastkd::triton_row_stats", mutates_args=())
def triton_row_stats(student: torch.Tensor, teacher: torch.Tensor, inv_temperature: float, vocab_size: int,
                     with_ce: bool) -> torch.Tensor:
    return _launch_row_stats(student, teacher, inv_temperature, vocab_size, with_ce)


triton_kd_forward.register_fake(fake_forward)
triton_kd_forward_inplace.register_fake(fake_forward_inplace)
triton_scale_grad_.register_fake(fake_scale_grad_)
triton_row_stats.register_fake(fake_row_stats)

row_stats = torch.ops.fastkd.triton_row_stats


def kernels_interpreted() -> bool:
    """True when the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_kd_forward_kernel, triton.runtime.JITFunction)


def _supports(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and kernels_interpreted()


BACKEND = KernelBackend("triton", torch.ops.fastkd.triton_kd_forward, torch.ops.fastkd.triton_kd_forward_inplace,
                        torch.ops.fastkd.triton_scale_grad_, _supports)
