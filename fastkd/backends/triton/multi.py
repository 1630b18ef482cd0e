"""Fused KD loss and gradient against K teachers (1 <= K <= MAX_KERNEL_TEACHERS): one program per row.

Per row, with the student's transformed logits s' and each teacher's t'_k (rows.py: the
logit options, one teacher transform for all), temperature T, the first V columns,
a = s'/T, q = softmax(a), p_k = softmax(t'_k / T), and the row's weights w_k (column
``row`` of the [K, N] weights, read first; docs/multi_teacher.md states the contract):

    A = {k : w_k != 0}   the active teachers. A teacher outside A is not read in this row
                         (NaN or garbage there changes nothing): one-hot routing reads one
                         teacher per row. A NaN weight is active, so it reaches the loss.
    W = sum_k w_k        (1 for a mixture, up to the rounding its check allows)

    mixture   D(m, q) with m = sum_k w_k p_k, per entry from log m = logsumexp_k (log w_k + log p_k)
              (anchored at the entry's largest term: never the log of a sum that underflows),
              then each divergence's single-teacher terms (dense.py) with (log p, p) -> (log m, m):
        forward_kl  D = sum m (log m - log q)               dD/da = W q - m
        reverse_kl  D = sum q h,  h = log q - log m         dD/da = q (h - sum q h)
        jsd         D = beta KL(m||M) + (1-beta) KL(q||M),  M = beta m + (1-beta) q,
                    h = log q - log M                       dD/da = (1-beta) q (h - sum q h)
        tvd         D = 1/2 sum |q - m|,  h = sign(q - m)/2  dD/da = q (h - sum q h)
    sum       sum_k w_k D(p_k, q). Every gradient is linear in the per-teacher terms, so one
              per-entry combination H takes the place of h, and one set of row sums serves
              every teacher:
        forward_kl  D = sum_k w_k sum p_k (log p_k - log q)  dD/da = W q - sum_k w_k p_k
        reverse_kl  H = sum_k w_k (log q - log p_k)          dD/da = q (H - sum q H)
        jsd         H = sum_k w_k (log q - log M_k),  M_k = beta p_k + (1-beta) q,
                    D = beta sum_k w_k sum p_k (log p_k - log M_k) + (1-beta) sum q H
                                                             dD/da = (1-beta) q (H - sum q H)
        tvd         H = sum_k w_k sign(q - p_k)/2,  D = 1/2 sum_k w_k sum |q - p_k|
                                                             dD/da = q (H - sum q H)

(``W q - m`` is the gradient of sum m (log m - log q) whatever the weights sum to: the
mixture is used as given, never renormalised, as the reference does.) The loss and the
gradient are then those of dense.py: div_weight D plus the T = 1 terms (CE with
ce_weight = 1 - alpha, label smoothing, z-loss) on s', the gradient chained through the
student's transform and times the reduction's scale, ignored rows zero, labels outside
[0, V) NaN. With one active teacher of weight 1 every entry is the single-teacher one
(log m = log p + log2(1), exactly).

The kernel sweeps each row in blocks of columns, whatever its length, in the phases every
backend names (rows.py):

    row_stats   one sweep: the student's max and sum-exp of s'/T (and the T = 1 sum-exp for
                CE or the z-loss) and each active teacher's of t'_k/T, online as
                rows.row_stats_sweep (K + 1 streams, each row read once)
    row_sums    reverse_kl, jsd, tvd: one more sweep, the centring sums of q and h (or H) in
                fp64 across blocks (dense.py: ``_centred_sums``, the peaked-row split), and
                sum-mode tvd's value; mixture tvd keeps dense.py's side masses (h takes
                three values: the centring is exact)
    write_grad  one more sweep: the per-entry terms again, the gradient written once;
                forward_kl's value and jsd's beta term summed on the way

Traffic: forward_kl reads the student and each active teacher row twice, the others three
times (as the dense multi-block path), and writes the gradient once; one-hot routing
reads one teacher. Per entry, the mixture costs one exp2 per active teacher, one log2 and
one exp2 (m). Not yet here: a single-block path holding the row in registers, and the
peeled sweeps of dense.py (rows not on 16 bytes load without 16-byte vectors).

Teachers are K pointer arguments (the unused ones a dummy, never read), each specialised
by Triton on its own dtype, with their own row strides; K is a constexpr, and the
per-teacher row state lives in K-tuples unrolled by ``tl.static_range``. Weights are fp32
with any strides (constant weights: stride 0 along N).
"""
import torch
import triton
import triton.language as tl

from ...config import MultiKernelSettings, TEACHER_MODES, resolve_divergence
from .. import MAX_KERNEL_TEACHERS, check_multi_operator_args
from . import launch
from .dense import (DIVERGENCE_IDS, _centre, _centred_sums, _divergence_value, _grad_constants, _log2_mixture,
                    _tvd_grad, kernel_scalars)
from .launch import ce_mode, kernel_launch, logit_options, multi_teacher_config
from .rows import (CE_RAW, CE_SHARED, LN2, LOG2E, OPT_NO_CE, OPT_SMOOTH, add_block_sums, anchor, fill_row,
                   hard_label_grads, hard_label_loss, row_base, student_x, teacher_x, write_grad, zero32, zero64)

MODE_IDS = {name: i for i, name in enumerate(TEACHER_MODES)}  # the kernels' teacher_mode_id (fastkd/config.py)
_MIXTURE = tl.constexpr(MODE_IDS["mixture"])  # sum: the other case
_FORWARD_KL = tl.constexpr(DIVERGENCE_IDS["forward_kl"])
_REVERSE_KL = tl.constexpr(DIVERGENCE_IDS["reverse_kl"])
_JSD = tl.constexpr(DIVERGENCE_IDS["jsd"])
_TVD = tl.constexpr(DIVERGENCE_IDS["tvd"])
_CE_SHARED = tl.constexpr(CE_SHARED)
_CE_RAW = tl.constexpr(CE_RAW)
_SMOOTH = tl.constexpr(OPT_SMOOTH)
_NO_CE = tl.constexpr(OPT_NO_CE)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------
# Loads of one block.

@triton.jit
def _load_student(s_row, cols, live, xo, OPTS: tl.constexpr):
    """s' of the block's columns, -inf past V (rows.load_pair's student half)."""
    return student_x(tl.load(s_row + cols, mask=live, other=float("-inf")).to(tl.float32), live, xo, OPTS)


@triton.jit
def _load_teacher(t_row, cols, live, xo, OPTS: tl.constexpr):
    """t' of one teacher at the block's columns, -inf past V. Called only for an active
    teacher (the callers branch on its weight), so an inactive one is never read."""
    return teacher_x(tl.load(t_row + cols, mask=live, other=float("-inf")).to(tl.float32), live, xo, OPTS)


# ---------------------------------------------------------------------------------------
# row_stats: the student and every active teacher in one sweep.

@triton.jit
def _row_stats_sweep(s_row, t_rows, active, V, c, inv_temperature, temperature, xo,
                     K: tl.constexpr, BLOCK: tl.constexpr, RAW: tl.constexpr, OPTS: tl.constexpr):
    """(a_s, z_s, a_r, z_r, a_t, z_t): the anchors (bits, rows.anchors) and anchored
    sum-exps of s'/T, of s' (RAW: CE at T != 1) and of each teacher's t'_k/T (K-tuples;
    an inactive teacher keeps a -inf anchor and a zero sum: never read). Online as
    rows.row_stats_sweep: per-lane running sums rescaled when a block's max moves the
    anchor, one exp2 per element and stream."""
    cols0 = tl.arange(0, BLOCK)
    ninf = tl.full((), float("-inf"), tl.float32)
    zeros = tl.zeros([BLOCK], dtype=tl.float32)
    m_s = ninf
    a_s = ninf
    a_r = ninf
    z_s = zeros
    z_r = zeros
    m_t = ()
    a_t = ()
    z_t = ()
    for k in tl.static_range(K):
        m_t += (ninf,)
        a_t += (ninf,)
        z_t += (zeros,)
    for start in range(0, V, BLOCK):
        cols = start + cols0
        live = cols < V
        s = _load_student(s_row, cols, live, xo, OPTS)
        m_s = tl.maximum(m_s, tl.max(s, axis=0))
        ms_nat = m_s * inv_temperature  # the anchors rounded as rows.anchors rounds them
        n_s = ms_nat * LOG2E
        n_r = (temperature * ms_nat) * LOG2E
        # exp2(old - new) is 0 while the old anchor is -inf, 1 when the max did not move.
        z_s = z_s * tl.exp2(a_s - anchor(n_s)) + tl.exp2(s * c - anchor(n_s))
        if RAW:
            z_r = z_r * tl.exp2(a_r - anchor(n_r)) + tl.exp2(s * LOG2E - anchor(n_r))
        a_s, a_r = n_s, n_r
        next_m = ()
        next_a = ()
        next_z = ()
        for k in tl.static_range(K):
            m_k = m_t[k]
            a_k = a_t[k]
            z_k = z_t[k]
            if active[k]:
                t = _load_teacher(t_rows[k], cols, live, xo, OPTS)
                m_k = tl.maximum(m_k, tl.max(t, axis=0))
                n_k = (m_k * inv_temperature) * LOG2E
                z_k = z_k * tl.exp2(a_k - anchor(n_k)) + tl.exp2(t * c - anchor(n_k))
                a_k = n_k
            next_m += (m_k,)
            next_a += (a_k,)
            next_z += (z_k,)
        m_t = next_m
        a_t = next_a
        z_t = next_z
    sums_t = ()
    for k in tl.static_range(K):
        sums_t += (tl.sum(z_t[k], axis=0),)
    return a_s, tl.sum(z_s, axis=0), a_r, tl.sum(z_r, axis=0), a_t, sums_t


# ---------------------------------------------------------------------------------------
# The per-entry terms of a block (all logarithms in bits).

@triton.jit
def _log2_teacher_mixture(cols, live, t_rows, active, c_t, c, xo, K: tl.constexpr, BLOCK: tl.constexpr,
                          OPTS: tl.constexpr):
    """log2 m = log2 sum_k w_k p_k per entry: u_k = t'_k c - c_k = log2(w_k p_k) for each
    active teacher (c_k = lse2_k - log2 w_k, a row constant), anchored at the entry's
    largest u_k. -inf where every term is (past V, or p_k = 0 for every k); NaN where a
    term is NaN (NaN-propagating max)."""
    hi = tl.full([BLOCK], float("-inf"), tl.float32)
    u = ()
    for k in tl.static_range(K):
        u_k = hi  # a placeholder for an inactive teacher, never read
        if active[k]:
            u_k = _load_teacher(t_rows[k], cols, live, xo, OPTS) * c - c_t[k]
            hi = tl.maximum(hi, u_k, propagate_nan=tl.PropagateNan.ALL)
        u += (u_k,)
    ref = anchor(hi)  # an all -inf entry: anchored at 0 (exp2(-inf - -inf) would be NaN)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        if active[k]:
            total += tl.exp2(u[k] - ref)
    return ref + tl.log2(total)


@triton.jit
def _half_sign(d):
    """sign(d)/2, NaN where d is NaN (a NaN teacher entry must reach tvd's gradient)."""
    return tl.where(d > 0.0, 0.5, tl.where(d < 0.0, -0.5, tl.where(d == 0.0, 0.0, float("nan"))))


@triton.jit
def _entry_terms(s, cols, live, t_rows, active, ws, W, lse2_t, c_t, c, lse2_s, log2_beta, log2_1mb, xo,
                 K: tl.constexpr, DIVERGENCE: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
                 OPTS: tl.constexpr):
    """(q, x, y) of a block whose student values are ``s`` (s'), reading each active teacher once:

        forward_kl  x = dD/da (W q - m, or W q - sum_k w_k p_k); y: D's terms
        reverse_kl  x = h or H; y = 0
        jsd         x = h or H; y: the beta term's p (log p - log M), weighted in sum mode
        tvd         mixture: x = q - m, y = 1/2 |q - m|; sum: x = H, y = 1/2 sum_k w_k |q - p_k|

    (the module docstring). Entries with q = 0 get h = 0 and those with p = 0 (or m = 0) no
    value term (0 log 0 = 0 by selects, which let NaN through)."""
    lq = s * c - lse2_s
    q = tl.exp2(lq)
    if MODE == _MIXTURE:
        lm = _log2_teacher_mixture(cols, live, t_rows, active, c_t, c, xo, K, BLOCK, OPTS)
        m = tl.exp2(lm)
        if DIVERGENCE == _FORWARD_KL:
            x = W * q - m
            y = tl.where(m == 0.0, 0.0, m * (lm - lq))
        elif DIVERGENCE == _TVD:
            x = q - m
            y = 0.5 * tl.abs(x)
        elif DIVERGENCE == _JSD:
            l_mix = _log2_mixture(lm, lq, log2_beta, log2_1mb)
            x = tl.where(q == 0.0, 0.0, lq - l_mix)
            y = tl.where(m == 0.0, 0.0, m * (lm - l_mix))
        else:
            x = tl.where(q == 0.0, 0.0, lq - lm)
            y = tl.zeros([BLOCK], dtype=tl.float32)
    else:
        x = tl.zeros([BLOCK], dtype=tl.float32)
        y = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):
            if active[k]:
                lp = _load_teacher(t_rows[k], cols, live, xo, OPTS) * c - lse2_t[k]
                w = ws[k]
                if DIVERGENCE == _FORWARD_KL:
                    p = tl.exp2(lp)
                    x -= w * p
                    y += w * tl.where(p == 0.0, 0.0, p * (lp - lq))
                elif DIVERGENCE == _TVD:
                    d = q - tl.exp2(lp)
                    x += w * _half_sign(d)
                    y += w * (0.5 * tl.abs(d))
                elif DIVERGENCE == _JSD:
                    l_mix = _log2_mixture(lp, lq, log2_beta, log2_1mb)
                    p = tl.exp2(lp)
                    x += w * tl.where(q == 0.0, 0.0, lq - l_mix)
                    y += w * tl.where(p == 0.0, 0.0, p * (lp - l_mix))
                else:
                    x += w * tl.where(q == 0.0, 0.0, lq - lp)
        if DIVERGENCE == _FORWARD_KL:
            x += W * q
    return q, x, y


# ---------------------------------------------------------------------------------------
# row_sums and write_grad sweeps.

@triton.jit
def _row_sums_sweep(s_row, t_rows, active, ws, W, lse2_t, c_t, V, c, lse2_s, log2_beta, log2_1mb, xo,
                    K: tl.constexpr, DIVERGENCE: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
                    OPTS: tl.constexpr):
    """reverse_kl, jsd, tvd: the four row sums the gradient's constants come from
    (dense.py's ``_grad_constants``) and sum-mode tvd's value. Mixture tvd: 1/2 |q - m| and
    the student mass where q > m, q < m, q == m (fp32, as dense.py); otherwise the centring
    sums of q and h (H) (``_centred_sums``), fp64 across blocks (one add per sum per block)."""
    if DIVERGENCE == _TVD and MODE == _MIXTURE:
        zero = zero32()
    else:
        zero = zero64()
    acc0 = zero
    acc1 = zero
    acc2 = zero
    acc3 = zero
    value = zero32()
    cols0 = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        cols = start + cols0
        live = cols < V
        s = _load_student(s_row, cols, live, xo, OPTS)
        q, x, y = _entry_terms(s, cols, live, t_rows, active, ws, W, lse2_t, c_t, c, lse2_s, log2_beta, log2_1mb, xo,
                               K, DIVERGENCE, MODE, BLOCK, OPTS)
        if DIVERGENCE == _TVD and MODE == _MIXTURE:
            acc0, acc1, acc2, acc3 = add_block_sums(acc0, acc1, acc2, acc3, y, tl.where(x > 0.0, q, 0.0),
                                                    tl.where(x < 0.0, q, 0.0), tl.where(x == 0.0, q, 0.0))
        else:
            sq, sqh, bqh, bq = _centred_sums(q, x)
            acc0, acc1, acc2, acc3 = add_block_sums(acc0, acc1, acc2, acc3, sq, sqh, bqh, bq)
            if DIVERGENCE == _TVD:
                value += tl.sum(y, axis=0)
    return acc0, acc1, acc2, acc3, value


@triton.jit
def _grad_constants_of(sum0, sum1, sum2, sum3, value, beta, DIVERGENCE: tl.constexpr, MODE: tl.constexpr):
    """(k0, k1, k2, k3, value of the row sums) as dense.py's ``_grad_constants``; sum-mode
    tvd takes the centred form (H has more than three values) with H in plain units (k3 = 1)
    and its value summed apart."""
    if DIVERGENCE == _TVD and MODE != _MIXTURE:
        k0, k1, k2, k3, qh = _grad_constants(sum0, sum1, sum2, sum3, beta, _REVERSE_KL)
        return k0, k1, k2, 1.0, value
    else:
        return _grad_constants(sum0, sum1, sum2, sum3, beta, DIVERGENCE)


@triton.jit
def _write_grad_sweep(s_row, g_row, t_rows, active, ws, W, lse2_t, c_t, V, g_width, label, c, lse2_s, log2_beta,
                      log2_1mb, k0, k1, k2, k3, gdiv, lse2_r, gh, xo,
                      K: tl.constexpr, DIVERGENCE: tl.constexpr, MODE: tl.constexpr, CE: tl.constexpr,
                      BLOCK: tl.constexpr, OPTS: tl.constexpr):
    """write_grad over the student's row (zeros past V), given the row constants k0..k3
    (unused by forward_kl). Returns (the sweep's value of D for dense.py's
    ``_divergence_value``: forward_kl's sum, jsd's beta term; sum of s' below V with label
    smoothing, else 0)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    kl_pm = zero32()
    sum_s = zero32()
    cols0 = tl.arange(0, BLOCK)
    for start in range(0, g_width, BLOCK):
        cols = start + cols0
        live = cols < V
        s = _load_student(s_row, cols, live, xo, OPTS)
        if (_SMOOTH & OPTS) != 0:
            sum_s += tl.sum(tl.where(live, s, 0.0), axis=0)
        q, x, y = _entry_terms(s, cols, live, t_rows, active, ws, W, lse2_t, c_t, c, lse2_s, log2_beta, log2_1mb, xo,
                               K, DIVERGENCE, MODE, BLOCK, OPTS)
        if DIVERGENCE == _FORWARD_KL:
            w = x
            acc += y
        elif DIVERGENCE == _TVD and MODE == _MIXTURE:
            w = _tvd_grad(q, x, k0, k1, k2)
        else:
            w = _centre(q, x, k0, k1, k2, k3)
            if DIVERGENCE == _JSD:
                kl_pm += tl.sum(y, axis=0)
        write_grad(g_row, cols, V, g_width, s, w, gdiv, label, lse2_r, gh, xo, CE, OPTS)
    if DIVERGENCE == _FORWARD_KL:
        return tl.sum(acc, axis=0), sum_s
    else:
        return kl_pm, sum_s


# ---------------------------------------------------------------------------------------
# The kernel.

@triton.jit
def _multi_row(s_row, t_rows, g_row, w_row, w_stride_k, loss_ptr, label, V, g_width,
               c, inv_temperature, temperature, beta, log2_beta, log2_1mb, div_weight, ce_weight, gdiv, gce, scale, xo,
               K: tl.constexpr, DIVERGENCE: tl.constexpr, MODE: tl.constexpr, CE: tl.constexpr, BLOCK: tl.constexpr,
               OPTS: tl.constexpr):
    """One counted row: its loss into loss_ptr and its gradient (label -1: no labels)."""
    CE_TERM: tl.constexpr = CE != 0 and (_NO_CE & OPTS) == 0  # else the T = 1 statistics are the z-loss's
    # The weights first: they decide which teacher rows are read at all.
    ws = ()
    active = ()
    W = zero32()
    for k in tl.static_range(K):
        w = tl.load(w_row + k * w_stride_k).to(tl.float32)
        ws += (w,)
        active += (w != 0.0,)
        W += w
    s_label = 0.0
    if CE_TERM:  # before an in-place write over it
        s_label = student_x(tl.load(s_row + label).to(tl.float32), True, xo, OPTS)

    # row_stats.
    a_s, z_s, a_r, z_r, a_t, z_t = _row_stats_sweep(s_row, t_rows, active, V, c, inv_temperature, temperature, xo,
                                                    K, BLOCK, CE == _CE_RAW, OPTS)
    if CE == _CE_SHARED:  # T == 1: the CE softmax is the student's own
        z_r = z_s
        a_r = a_s
    lse2_s = anchor(a_s) + tl.log2(z_s)
    lse2_r = 0.0
    if CE != 0:
        lse2_r = anchor(a_r) + tl.log2(z_r)
    gh = hard_label_grads(gce, scale, lse2_r, xo, OPTS)
    # Per teacher: lse2_k, and the mixture's c_k = lse2_k - log2 w_k (log2 p_k + log2 w_k =
    # t'_k c - c_k). An inactive teacher's are never used.
    lse2_t = ()
    c_t = ()
    for k in tl.static_range(K):
        lse2_k = anchor(a_t[k]) + tl.log2(z_t[k])
        lse2_t += (lse2_k,)
        c_t += (lse2_k - tl.log2(ws[k]),)

    # row_sums and write_grad.
    if DIVERGENCE == _FORWARD_KL:  # no row sum before the gradient: D is summed on the way
        sweep_value, sum_s = _write_grad_sweep(s_row, g_row, t_rows, active, ws, W, lse2_t, c_t, V, g_width, label,
                                               c, lse2_s, log2_beta, log2_1mb, 0.0, 0.0, 0.0, 0.0, gdiv, lse2_r, gh,
                                               xo, K, DIVERGENCE, MODE, CE, BLOCK, OPTS)
        D = _divergence_value(0.0, sweep_value, beta, DIVERGENCE)
    else:
        sum0, sum1, sum2, sum3, value = _row_sums_sweep(s_row, t_rows, active, ws, W, lse2_t, c_t, V, c, lse2_s,
                                                        log2_beta, log2_1mb, xo, K, DIVERGENCE, MODE, BLOCK, OPTS)
        k0, k1, k2, k3, sums_value = _grad_constants_of(sum0, sum1, sum2, sum3, value, beta, DIVERGENCE, MODE)
        sweep_value, sum_s = _write_grad_sweep(s_row, g_row, t_rows, active, ws, W, lse2_t, c_t, V, g_width, label,
                                               c, lse2_s, log2_beta, log2_1mb, k0, k1, k2, k3, gdiv, lse2_r, gh,
                                               xo, K, DIVERGENCE, MODE, CE, BLOCK, OPTS)
        D = _divergence_value(sums_value, sweep_value, beta, DIVERGENCE)

    row_loss = div_weight * D
    if CE != 0:
        row_loss += hard_label_loss(lse2_r, s_label, sum_s, ce_weight, xo, CE_TERM, OPTS)
    tl.store(loss_ptr, row_loss)


@triton.jit
def multi_kd_forward_kernel(
    S, T0, T1, T2, T3, G, LOSS, LABELS, GRAD_SCALE, WEIGHTS,
    s_stride, t_stride0, t_stride1, t_stride2, t_stride3, w_stride_k, w_stride_n, g_stride, V, g_width,
    c, inv_temperature, temperature, beta, log2_beta, log2_1mb, div_weight, ce_weight, ignore_index,
    s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss,
    K: tl.constexpr, DIVERGENCE: tl.constexpr, MODE: tl.constexpr, HAS_LABELS: tl.constexpr, CE: tl.constexpr,
    BLOCK: tl.constexpr, OPTS: tl.constexpr,
):
    """The several-teachers forward of whole rows: T0..T{K-1} the teachers (the others a
    dummy, never read), WEIGHTS the [K, N] weights by their strides. s_mul .. z_loss: the
    logit options' scalars (rows.py: XO), read where OPTS says."""
    row = tl.program_id(0).to(tl.int64)
    s_row = row_base(S, row, s_stride)
    g_row = row_base(G, row, g_stride)
    t_rows = (row_base(T0, row, t_stride0), row_base(T1, row, t_stride1), row_base(T2, row, t_stride2),
              row_base(T3, row, t_stride3))
    w_row = row_base(WEIGHTS, row, w_stride_n)
    xo = (s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss)
    scale = tl.load(GRAD_SCALE).to(tl.float32)
    gdiv = scale * div_weight * inv_temperature
    gce = scale * ce_weight
    if HAS_LABELS:
        label = tl.load(LABELS + row)
        ignored = label == ignore_index
        if ignored | (label < 0) | (label >= V):
            # Ignored: out of every term, its weights unread. Out of range: NaN marks the row.
            fill = tl.where(ignored, 0.0, float("nan"))
            tl.store(LOSS + row, fill)
            fill_row(g_row, 0, g_width, fill, BLOCK)
        else:
            _multi_row(s_row, t_rows, g_row, w_row, w_stride_k, LOSS + row, label, V, g_width,
                       c, inv_temperature, temperature, beta, log2_beta, log2_1mb, div_weight, ce_weight, gdiv, gce,
                       scale, xo, K, DIVERGENCE, MODE, CE, BLOCK, OPTS)
    else:
        _multi_row(s_row, t_rows, g_row, w_row, w_stride_k, LOSS + row, -1, V, g_width,
                   c, inv_temperature, temperature, beta, log2_beta, log2_1mb, div_weight, ce_weight, gdiv, gce,
                   scale, xo, K, DIVERGENCE, MODE, CE, BLOCK, OPTS)


# ---------------------------------------------------------------------------------------
# Launchers.

def _launch(student, teachers, weights, labels, grad_scale, k: MultiKernelSettings, grad):
    n = student.shape[0]
    loss = torch.empty((n,), dtype=torch.float32, device=student.device)
    if n == 0:
        return loss
    # JSD at beta 0 / 1 is forward / reverse KL (as dense.py: beta may have been traced).
    divergence = resolve_divergence(k.divergence, k.beta)
    opts, xo = logit_options(k)
    K = len(teachers)
    cfg = multi_teacher_config(k.vocab_size, K, launch.BLOCK_OVERRIDE)
    c, inv_t, temp, log2_beta, log2_1mb = kernel_scalars(k.inv_temperature, k.beta)
    # Pointer arguments past K: the first teacher again (stride 0), never read.
    spare = MAX_KERNEL_TEACHERS - K
    pointers = tuple(teachers) + (teachers[0],) * spare
    strides = tuple(t.stride(0) for t in teachers) + (0,) * spare
    with kernel_launch(student.device):
        multi_kd_forward_kernel[(n,)](
            student, *pointers, grad, loss, labels if labels is not None else loss, grad_scale, weights,
            student.stride(0), *strides, weights.stride(0), weights.stride(1), grad.stride(0), k.vocab_size,
            grad.shape[1], c, inv_t, temp, float(k.beta), log2_beta, log2_1mb, float(k.div_weight),
            float(k.ce_weight), int(k.ignore_index), *xo,
            K=K, DIVERGENCE=DIVERGENCE_IDS[divergence], MODE=int(k.teacher_mode_id), HAS_LABELS=labels is not None,
            CE=ce_mode(k), BLOCK=cfg.block, OPTS=opts, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return loss


def forward(student, teachers, weights, labels, grad_scale, k: MultiKernelSettings):
    """(loss [N] fp32, grad) with the gradient in a new tensor of the student's dtype."""
    check_multi_operator_args(student, teachers, weights, labels, grad_scale, k, SUPPORTED_DTYPES)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    return _launch(student, teachers, weights, labels, grad_scale, k, grad), grad


def forward_inplace(student, teachers, weights, labels, grad_scale, k: MultiKernelSettings):
    """loss [N] fp32, the gradient written over ``student``: each program reads the label's
    logit first, and writes a block of its row after its last read of that block."""
    check_multi_operator_args(student, teachers, weights, labels, grad_scale, k, SUPPORTED_DTYPES)
    return _launch(student, teachers, weights, labels, grad_scale, k, student)
