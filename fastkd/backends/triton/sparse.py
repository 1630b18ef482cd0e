"""Fused KD loss and gradient against a sparse teacher (K ids and their log-probabilities
per token): one program per row.

Per row, with student logits s (the first V columns count), temperature T, a = s/T,
q = softmax(a) over the V columns, and the teacher's support S: K slots of ids j with
log-probabilities log p_j (slots with id < 0 are empty), P = sum_S p, Q = sum_S q:

    tail="bucket"   K + 1 bins: the support, and one tail bin of mass p_t = 1 - P on the
                    teacher side, q_t = 1 - Q on the student side. Equal, in value and
                    gradient, to the dense divergence between q and the implicit teacher
                    p~ (p on S, q (1 - P)/(1 - Q) off S), so off S every gradient entry is
                    q_i times one row constant w_off:
        forward_kl  D = sum_bins p (log p - log q)     dD/da_j = q_j - p_j        w_off = 1 - p_t/q_t
        reverse_kl  D = sum_bins q h, h = log q - log p
                                                       dD/da_j = q_j (h_j - C)    w_off = h_t - C
        jsd         D = beta KL(p||m) + (1-beta) KL(q||m) over the bins, h = log q - log m
                                                       dD/da_j = (1-beta) q_j (h_j - C)
                                                                                  w_off = (1-beta)(h_t - C)
        tvd         D = 1/2 sum_bins |p - q|, h = sign(q - p)/2
                                                       dD/da_j = q_j (h_j - C)    w_off = h_t - C
                    with C = sum_bins q h (divided by the bins' computed mass, ~1).
    tail="renorm"   the bins are S alone with p^ = p/P, q^ = q/Q (q^ is the softmax of a over
                    S): the same formulas, w_off = 0; no full-row statistics are needed.
    tail="none"     forward KL only: D = sum_S p (log p - log q),
                    dD/da_j = P q_j - p_j, w_off = P.

    loss = div_weight D + ce_weight (lse(s) - s[label])
    ds_i = grad_scale (div_weight / T dD/da_i + ce_weight (softmax(s)_i - [i == label]))

With the logit options (rows.py; csrc/kd_params.h states the contract) s is the student's
transformed logits s' (logit_scale, softcap) wherever it is read, the CE term is label
smoothed and the z-loss added as in the dense kernels, and the gradient carries ds'/ds.
The teacher's log-probabilities are used as given.

The kernel, one program per row (or a fixed grid taking rows in turn: launch.SPARSE_PROGRAMS),
moves the row twice:

    support     the K slots: ids, log-probs and the gathers s[id] (issued before any write,
                so the in-place variant reads every logit it needs first); the ids sorted
                (duplicates: adjacent equal) into a scratch row the sweep walks.
    row_stats   one read of s: online max, the sum-exp of s/T over the columns NOT in S
                (each block skips the support ids below its end: one cached scalar load
                per id), and the T = 1 sum of every column for the CE term when T != 1,
                ``_student_stats_sweep``; skipped for renorm without CE.
    row_sums    the bins in float64 (K values: free): log P, Z_S, D and the gradient weights.
    write_grad  one more read of s and one write: q_i w_off (+ CE) for every column, zero
                past V; then, after a barrier, the K support columns are written again with
                their own gradient (the only stores of a column by two threads of the
                program; the barrier orders them).

Numerics (docs/sparse.md, the contract every backend follows): 1 - P = -expm1(log P) in
float64, log P a log-sum-exp of the support's log-probs (never 1 - sum p, which cancels
in fp32 as P -> 1: the failure ModelOpt reported at K = 1024); P >= 1 leaves the teacher's
tail empty. 1 - Q = Z_off / Z with Z_off the sum-exp over the columns off S (excluded while
streaming, never Z - Z_S) and Z = Z_off + Z_S, Z_S from the gathered logits in float64. A
support holding all V columns has empty tail bins. Empty bins contribute 0 (0 log 0 = 0);
an empty slot's log-prob is never read. A valid id >= V or a valid id twice (the Python
layer raises for CPU tensors) gives the row a NaN loss and a NaN gradient row, never a
number. Ignored rows (label == ignore_index): zero loss and gradient. Labels outside
[0, V): NaN, as in the dense kernels. Traffic and the floor: docs/sparse_kernels.md.
"""
import math

import torch
import triton
import triton.language as tl

from ...config import DIVERGENCES, TAILS, SparseKernelSettings, resolve_divergence
from .. import check_sparse_operator_args
from .launch import MULTI_BLOCK, kernel_launch, warps_for
from . import launch
from .launch import ce_mode, logit_options
from .rows import (CE_NONE, CE_RAW, CE_SHARED, LN2, LOG2E, NO_COLUMN, OPT_NO_CE, OPT_SMOOTH, STATS_WIDTH, anchor,
                   entropy_terms, fill_row, hard_label_grad, hard_label_grads, hard_label_loss, row_base,
                   store_blank_stats, store_stats, student_chain, student_x, write_grad, zero32)

DIVERGENCE_IDS = {name: i for i, name in enumerate(DIVERGENCES)}
TAIL_IDS = {name: i for i, name in enumerate(TAILS)}
_FORWARD_KL = tl.constexpr(DIVERGENCE_IDS["forward_kl"])
_REVERSE_KL = tl.constexpr(DIVERGENCE_IDS["reverse_kl"])
_JSD = tl.constexpr(DIVERGENCE_IDS["jsd"])
_TVD = tl.constexpr(DIVERGENCE_IDS["tvd"])
_BUCKET = tl.constexpr(TAIL_IDS["bucket"])
_RENORM = tl.constexpr(TAIL_IDS["renorm"])
_NONE = tl.constexpr(TAIL_IDS["none"])
_CE_SHARED = tl.constexpr(CE_SHARED)
_CE_RAW = tl.constexpr(CE_RAW)
_SMOOTH = tl.constexpr(OPT_SMOOTH)
_NO_CE = tl.constexpr(OPT_NO_CE)
_STATS_WIDTH = tl.constexpr(STATS_WIDTH)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ID_DTYPES = (torch.int32, torch.int64)
MIN_K_BLOCK = 16


# ---------------------------------------------------------------------------------------
# row_stats of the student alone, with the support's columns left out of the sum.

@triton.jit
def _student_stats_sweep(s_row, sorted_row, first, V, c, inv_temperature, temperature, xo,
                         BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, RAW: tl.constexpr, OPTS: tl.constexpr):
    """(anchor of s/T in bits, sum-exp of s/T at it over the columns NOT in the support,
    anchor of s, sum-exp of s at it over every column, max of s): one read of the row,
    per-lane running sums rescaled when the block max moves (the online softmax of
    rows.row_stats_sweep, student side only). The max is over every column.

    ``sorted_row`` holds the row's support ids in increasing order from position ``first``
    (the launcher's scratch, written by this program): each block takes the ids below its
    end, so the exclusion costs one cached scalar load per id and per block, whatever K."""
    cols = tl.arange(0, BLOCK)
    m = float("-inf")
    a_s = float("-inf")
    a_r = float("-inf")
    z_s = tl.zeros([BLOCK], dtype=tl.float32)
    z_r = tl.zeros([BLOCK], dtype=tl.float32)
    ptr = first
    nxt = tl.load(sorted_row + ptr, mask=ptr < K_BLOCK, other=V + BLOCK)
    for start in range(0, V, BLOCK):
        live = start + cols < V
        s = student_x(tl.load(s_row + start + cols, mask=live, other=float("-inf")).to(tl.float32), live, xo, OPTS)
        support = cols < 0  # all false
        while nxt < start + BLOCK:
            support = support | (cols == nxt - start)
            ptr += 1
            nxt = tl.load(sorted_row + ptr, mask=ptr < K_BLOCK, other=V + BLOCK)
        m = tl.maximum(m, tl.max(s, axis=0))
        ms_nat = m * inv_temperature
        n_s = ms_nat * LOG2E
        n_r = (temperature * ms_nat) * LOG2E
        # exp2(old - new) is 0 while the old anchor is -inf, 1 when the max did not move.
        z_s = z_s * tl.exp2(a_s - anchor(n_s)) + tl.where(support, 0.0, tl.exp2(s * c - anchor(n_s)))
        if RAW:
            z_r = z_r * tl.exp2(a_r - anchor(n_r)) + tl.exp2(s * LOG2E - anchor(n_r))
        a_s, a_r = n_s, n_r
    return anchor(a_s), tl.sum(z_s, axis=0), anchor(a_r), tl.sum(z_r, axis=0), m


# ---------------------------------------------------------------------------------------
# The support phase (float64 K-vectors).

@triton.jit
def _xlogy(x, y_log):
    """x * log y with 0 log 0 = 0 (x == 0 gives 0 whatever y, NaN still propagates through y
    where x > 0)."""
    return tl.where(x == 0.0, 0.0, x * y_log)


@triton.jit
def _log_mix(lp, lq, log_beta, log_1mb):
    """log(beta e^lp + (1 - beta) e^lq), -inf when both are -inf (float64)."""
    u = lp + log_beta
    v = lq + log_1mb
    hi = tl.maximum(u, v, propagate_nan=tl.PropagateNan.ALL)
    lo = tl.minimum(u, v, propagate_nan=tl.PropagateNan.ALL)
    return tl.where(hi == float("-inf"), hi, hi + tl.log(1.0 + tl.exp(lo - hi)))


@triton.jit
def _bins(lp, lq, p, q, p_t, q_t, beta, log_beta, log_1mb, DIVERGENCE: tl.constexpr):
    """Over the support bins (vectors lp, lq, p, q; empty slots hold p = q = 0) and the tail
    bin (p_t, q_t; both 0 for none): D, the support's dD/da (w) and the tail's per-element
    factor w_off (dD/da_i = q_i w_off off S). float64 throughout."""
    lp_t = tl.log(p_t)
    lq_t = tl.log(q_t)
    if DIVERGENCE == _FORWARD_KL:
        D = tl.sum(_xlogy(p, lp - lq), axis=0) + _xlogy(p_t, lp_t - lq_t)
        w = q - p
        w_off = tl.where(q_t > 0.0, 1.0 - p_t / q_t, 0.0)
    elif DIVERGENCE == _TVD:
        d = q - p
        d_t = q_t - p_t
        D = 0.5 * (tl.sum(tl.abs(d), axis=0) + tl.abs(d_t))
        # h_i - sum q h, exact from the student masses on each side of p (as the dense kernels).
        q_pos = tl.sum(tl.where(d > 0.0, q, 0.0), axis=0) + tl.where(d_t > 0.0, q_t, 0.0)
        q_neg = tl.sum(tl.where(d < 0.0, q, 0.0), axis=0) + tl.where(d_t < 0.0, q_t, 0.0)
        q_tie = tl.sum(tl.where(d == 0.0, q, 0.0), axis=0) + tl.where(d_t == 0.0, q_t, 0.0)
        nan_or_zero = D - D  # a NaN in the row must reach the gradient through the selects
        k_pos = q_neg + 0.5 * q_tie + nan_or_zero
        k_neg = -(q_pos + 0.5 * q_tie) + nan_or_zero
        k_tie = 0.5 * (q_neg - q_pos) + nan_or_zero
        w = q * tl.where(d > 0.0, k_pos, tl.where(d < 0.0, k_neg, k_tie))
        w_off = tl.where(d_t > 0.0, k_pos, tl.where(d_t < 0.0, k_neg, k_tie))
    else:  # reverse_kl, jsd: dD/da = scale q (h - C)
        if DIVERGENCE == _JSD:
            lm = _log_mix(lp, lq, log_beta, log_1mb)
            lm_t = _log_mix(lp_t, lq_t, log_beta, log_1mb)
            kl_pm = tl.sum(_xlogy(p, lp - lm), axis=0) + _xlogy(p_t, lp_t - lm_t)
            h = tl.where(q == 0.0, 0.0, lq - lm)
            h_t = tl.where(q_t == 0.0, 0.0, lq_t - lm_t)
        else:
            h = tl.where(q == 0.0, 0.0, lq - lp)
            h_t = tl.where(q_t == 0.0, 0.0, lq_t - lp_t)
        qh = tl.sum(q * h, axis=0) + q_t * h_t
        mass = tl.sum(q, axis=0) + q_t
        # Centred on sum q h / sum q: invariant to a common shift of h, as the exact gradient
        # is (the computed masses sum to 1 + O(1e-7)).
        centre = qh / mass
        if DIVERGENCE == _JSD:
            D = beta * kl_pm + (1.0 - beta) * qh
            scale = 1.0 - beta
        else:
            D = qh
            scale = 1.0
        w = scale * q * (h - centre)
        w_off = scale * (h_t - centre)
    return D, w, w_off


# ---------------------------------------------------------------------------------------
# The kernel.

@triton.jit
def _expm1(x):
    """exp(x) - 1 in float64 without its cancellation near 0 (a third-order series there)."""
    return tl.where(tl.abs(x) < 1e-5, x + x * x * (0.5 + x / 6.0), tl.exp(x) - 1.0)


@triton.jit
def _log_sum_exp(x, live):
    """log sum exp over the live lanes of a float64 vector; -inf when none is finite."""
    mx = tl.max(tl.where(live, x, float("-inf")), axis=0)
    ref = tl.where(mx == float("-inf"), 0.0, mx)
    return ref + tl.log(tl.sum(tl.where(live, tl.exp(x - ref), 0.0), axis=0))


@triton.jit
def _sparse_row(s_row, g_row, ids_row, lps_row, sorted_row, loss_ptr, label, K, V, g_width,
                c, inv_temperature, temperature, beta, log_beta, log_1mb, div_weight, ce_weight, gdiv, gce, scale, xo,
                DIVERGENCE: tl.constexpr, TAIL: tl.constexpr, CE: tl.constexpr, SWEEP: tl.constexpr,
                BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, OPTS: tl.constexpr, stats_out, RETURN_STATS: tl.constexpr):
    """One row (the phases of the module docstring). RETURN_STATS (the launcher then sweeps
    the row whatever the tail: the student's argmax, H(q) and Q need it): the row's
    per-token diagnostics into stats_out: P and Q from the support phase's log P and Z_S / Z,
    sum q log2 q where write_grad forms q, the student's argmax column the first holding
    the row_stats max, found by write_grad (per-lane running minima: in the row_stats sweep
    a block reduction per block took the sm_90 build from 98 to 117 registers), each block
    read before its gradient is written over it (in place); the teacher's best id the
    valid slot of highest log-prob (the first among ties)."""
    CE_TERM: tl.constexpr = CE != 0 and (_NO_CE & OPTS) == 0  # else the T = 1 statistics are the z-loss's
    # --- support: ids, log-probs, the gathers of s (all before any store to the row, so
    # the in-place variant reads what it needs first), the ids sorted into the scratch row.
    k = tl.arange(0, K_BLOCK)
    in_k = k < K
    ids = tl.load(ids_row + k, mask=in_k, other=-1).to(tl.int64)
    valid = ids >= 0
    live = valid & (ids < V)
    # An empty slot's log-prob is never read (it may be NaN).
    lp = tl.load(lps_row + k, mask=in_k & valid, other=float("-inf")).to(tl.float64)
    if RETURN_STATS:  # the teacher's best id: argmax of the log-probs (tie_break_left: the first slot)
        best = tl.argmax(lp, axis=0)
        best_id = tl.sum(tl.where(k == best, ids, 0), axis=0)
        any_valid = tl.sum(valid.to(tl.int32), axis=0) > 0
    s_sup = student_x(tl.load(s_row + ids, mask=live, other=float("-inf")).to(tl.float32), live, xo, OPTS)
    s_label = 0.0
    if CE_TERM:
        s_label = student_x(tl.load(s_row + label).to(tl.float32), True, xo, OPTS)
    ordered = tl.sort(tl.where(valid, ids, -1))
    after = tl.gather(ordered, tl.minimum(k + 1, K_BLOCK - 1), 0)
    # A valid id twice, or one >= V: the row's loss and gradient are NaN (contract).
    bad = tl.sum(((ordered == after) & (ordered >= 0) & (k + 1 < K_BLOCK)).to(tl.int32), axis=0)
    bad += tl.sum((valid & (ids >= V)).to(tl.int32), axis=0)
    first = tl.sum((ordered < 0).to(tl.int32), axis=0)
    if SWEEP:
        tl.store(sorted_row + k, tl.minimum(ordered, V).to(tl.int32))
        tl.debug_barrier()  # the sweep's threads read ids other threads stored

    # --- row_stats: one read of the row (sum over the columns off the support).
    a_s = 0.0
    z_off = 0.0
    a_r = 0.0
    z_r = 1.0
    m_s = 0.0  # the student's max (RETURN_STATS: write_grad finds its first column)
    if SWEEP:
        a_s, z_off, a_r, z_r, m_s = _student_stats_sweep(s_row, sorted_row, first, V, c, inv_temperature,
                                                         temperature, xo, BLOCK, K_BLOCK, CE == _CE_RAW, OPTS)

    # --- support phase, float64.
    # s/T in bits, in float64: the support's terms carry no rounding of their own (the
    # student-equals-teacher rows, where D is tiny, are measured by exactly these).
    x64 = s_sup.to(tl.float64) * inv_temperature * LOG2E
    n_live = tl.sum(live.to(tl.int32), axis=0)
    lp = tl.where(live, lp, float("-inf"))
    p = tl.where(live, tl.exp(lp), 0.0)
    log_mass_p = _log_sum_exp(lp, live)  # log P, -inf for an empty support
    # Z = Z_off + Z_S at the sweep's anchor: the row's normaliser, with no cancellation.
    z_sup = tl.sum(tl.where(live, tl.exp2(x64 - a_s), 0.0), axis=0)
    z = z_off.to(tl.float64) + z_sup
    lse2_s = a_s + tl.log2(z)  # float64
    if CE == _CE_SHARED:  # T == 1: the CE softmax is q
        lse2_r = lse2_s.to(tl.float32)
    else:
        lse2_r = a_r + tl.log2(z_r)
    if TAIL == _RENORM:
        # q^ = softmax of a over S, p^ = p / P: no full-row statistic. An empty support
        # (no valid id, or P = 0) contributes nothing.
        lq = tl.where(live, (x64 - _log_sum_exp(x64 * LN2, live) * LOG2E) * LN2, float("-inf"))
        empty = log_mass_p == float("-inf")
        lp_hat = tl.where(live, lp - tl.where(empty, 0.0, log_mass_p), float("-inf"))
        q = tl.where(live, tl.exp(lq), 0.0)
        zero = tl.full((), 0.0, tl.float64)
        D, w, w_off = _bins(lp_hat, lq, tl.exp(lp_hat), q, zero, zero, beta, log_beta, log_1mb, DIVERGENCE)
        D = tl.where(empty, 0.0, D)
        w = tl.where(empty, 0.0, w)
        w_off = 0.0
    else:
        lq = tl.where(live, (x64 - lse2_s) * LN2, float("-inf"))
        q = tl.where(live, tl.exp(lq), 0.0)
        if TAIL == _NONE:
            P = tl.exp(log_mass_p)
            D = tl.sum(_xlogy(p, lp - lq), axis=0)
            w = P * q - p
            w_off = P
        else:  # bucket: 1 - P = -expm1(log P), 1 - Q = Z_off / Z; both empty when S covers V
            full = n_live >= V
            p_t = tl.where(full | (log_mass_p >= 0.0), 0.0, -_expm1(log_mass_p))
            q_t = tl.where(full, 0.0, z_off.to(tl.float64) / z)
            D, w, w_off = _bins(lp, lq, p, q, p_t, q_t, beta, log_beta, log_1mb, DIVERGENCE)
    w_off32 = w_off.to(tl.float32)
    lse2_q = lse2_s.to(tl.float32)
    gh = hard_label_grads(gce, scale, lse2_r, xo, OPTS)

    # --- write_grad: q_i w_off (+ CE) over the row, then the support's own entries.
    cols = tl.arange(0, BLOCK)
    sum_s = zero32()  # of s' over the row (label smoothing's term of the loss)
    e_q = tl.zeros([BLOCK], dtype=tl.float32)  # sum q log2 q (RETURN_STATS), per lane
    col_s = tl.full([BLOCK], NO_COLUMN, tl.int32)  # per lane: the first column holding the student's max
    for start in range(0, g_width, BLOCK):
        if SWEEP:
            in_row = start + cols < V
            s = student_x(tl.load(s_row + start + cols, mask=in_row, other=float("-inf")).to(tl.float32), in_row,
                          xo, OPTS)
            wq = tl.exp2(s * c - lse2_q) * w_off32
            if RETURN_STATS:
                e_q += entropy_terms(s * c, lse2_q)
                col_s = tl.minimum(col_s, tl.where(s == m_s, start + cols, NO_COLUMN))
            if CE_TERM and (_SMOOTH & OPTS) != 0:
                sum_s += tl.sum(tl.where(in_row, s, 0.0), axis=0)
        else:
            s = tl.zeros([BLOCK], dtype=tl.float32)
            wq = tl.zeros([BLOCK], dtype=tl.float32)
        write_grad(g_row + start, cols, V - start, g_width - start, s, wq, gdiv, label - start, lse2_r, gh, xo, CE,
                   OPTS)
    tl.debug_barrier()  # the support's stores below land after the sweep's stores of the same columns
    g_sup = gdiv * w.to(tl.float32)
    if CE != 0:
        sm = tl.exp2(s_sup * LOG2E - lse2_r)
        g_sup = hard_label_grad(g_sup, ids, label, sm, gh, OPTS)
    g_sup = student_chain(g_sup, s_sup, xo, OPTS)
    tl.store(g_row + ids, g_sup.to(g_row.dtype.element_ty), mask=live)

    row_loss = div_weight * D.to(tl.float32)
    if CE != 0:
        row_loss += hard_label_loss(lse2_r, s_label, sum_s, ce_weight, xo, CE_TERM, OPTS)
    if bad > 0:
        tl.debug_barrier()
        fill_row(g_row, 0, g_width, float("nan"), BLOCK)
        row_loss = float("nan")
    tl.store(loss_ptr, row_loss)
    if RETURN_STATS:
        if bad > 0:
            store_blank_stats(stats_out)
        else:
            agree = any_valid & (best_id == tl.min(col_s, axis=0))
            store_stats(stats_out, tl.exp(log_mass_p), tl.sum(e_q, axis=0) * -LN2, agree, D, z_sup / z)


@triton.jit
def sparse_kd_forward_kernel(
    S, G, IDS, LPS, SORTED, LOSS, LABELS, GRAD_SCALE,
    n_rows, s_stride, g_stride, ids_stride, lps_stride, K, V, g_width,
    c, inv_temperature, temperature, beta, log_beta, log_1mb, div_weight, ce_weight, ignore_index,
    s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss,
    DIVERGENCE: tl.constexpr, TAIL: tl.constexpr, HAS_LABELS: tl.constexpr, CE: tl.constexpr,
    SWEEP: tl.constexpr, BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, PERSISTENT: tl.constexpr, OPTS: tl.constexpr,
    STATS_OUT, RETURN_STATS: tl.constexpr,
):
    # One row per program, or (PERSISTENT: launch.SPARSE_PROGRAMS) a fixed grid whose
    # programs take rows in turn: fewer rows in flight, so the write pass's second read of
    # a row may still find it in L2. The sorted-ids scratch is per program. (The loop is
    # compiled only when asked for: it took the sm_90 build from 80 to 121 registers.)
    # RETURN_STATS: the per-token diagnostics into STATS_OUT [N, STATS_WIDTH] fp32 (None
    # without: a constexpr, so the kernel compiles as before them).
    sorted_row = SORTED + tl.program_id(0).to(tl.int64) * K_BLOCK
    xo = (s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss)  # rows.py: XO
    if PERSISTENT:
        for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
            _sparse_kernel_row(tl.zeros((), dtype=tl.int64) + row, S, G, IDS, LPS, sorted_row, LOSS, LABELS,
                               GRAD_SCALE, s_stride, g_stride, ids_stride, lps_stride, K, V, g_width,
                               c, inv_temperature, temperature, beta, log_beta, log_1mb, div_weight, ce_weight,
                               ignore_index, xo, DIVERGENCE, TAIL, HAS_LABELS, CE, SWEEP, BLOCK, K_BLOCK, OPTS,
                               STATS_OUT, RETURN_STATS)
    else:
        _sparse_kernel_row(tl.program_id(0).to(tl.int64), S, G, IDS, LPS, sorted_row, LOSS, LABELS, GRAD_SCALE,
                           s_stride, g_stride, ids_stride, lps_stride, K, V, g_width,
                           c, inv_temperature, temperature, beta, log_beta, log_1mb, div_weight, ce_weight,
                           ignore_index, xo, DIVERGENCE, TAIL, HAS_LABELS, CE, SWEEP, BLOCK, K_BLOCK, OPTS,
                           STATS_OUT, RETURN_STATS)


@triton.jit
def _sparse_kernel_row(row, S, G, IDS, LPS, sorted_row, LOSS, LABELS, GRAD_SCALE,
                       s_stride, g_stride, ids_stride, lps_stride, K, V, g_width,
                       c, inv_temperature, temperature, beta, log_beta, log_1mb, div_weight, ce_weight, ignore_index,
                       xo, DIVERGENCE: tl.constexpr, TAIL: tl.constexpr, HAS_LABELS: tl.constexpr, CE: tl.constexpr,
                       SWEEP: tl.constexpr, BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, OPTS: tl.constexpr,
                       STATS_OUT, RETURN_STATS: tl.constexpr):
    if RETURN_STATS:
        stats_out = STATS_OUT + row * _STATS_WIDTH
    else:
        stats_out = STATS_OUT  # None
    s_row = row_base(S, row, s_stride)
    g_row = row_base(G, row, g_stride)
    ids_row = row_base(IDS, row, ids_stride)
    lps_row = row_base(LPS, row, lps_stride)
    scale = tl.load(GRAD_SCALE).to(tl.float32)
    gdiv = scale * div_weight * inv_temperature
    gce = scale * ce_weight
    if HAS_LABELS:
        label = tl.load(LABELS + row)
        ignored = label == ignore_index
        if ignored | (label < 0) | (label >= V):
            fill = tl.where(ignored, 0.0, float("nan"))
            tl.store(LOSS + row, fill)
            fill_row(g_row, 0, g_width, fill, BLOCK)
            if RETURN_STATS:
                store_blank_stats(stats_out)
        else:
            _sparse_row(s_row, g_row, ids_row, lps_row, sorted_row, LOSS + row, label, K, V, g_width,
                        c, inv_temperature, temperature, beta, log_beta, log_1mb, div_weight, ce_weight, gdiv, gce,
                        scale, xo, DIVERGENCE, TAIL, CE, SWEEP, BLOCK, K_BLOCK, OPTS, stats_out, RETURN_STATS)
    else:
        _sparse_row(s_row, g_row, ids_row, lps_row, sorted_row, LOSS + row, -1, K, V, g_width,
                    c, inv_temperature, temperature, beta, log_beta, log_1mb, div_weight, ce_weight, gdiv, gce,
                    scale, xo, DIVERGENCE, TAIL, CE, SWEEP, BLOCK, K_BLOCK, OPTS, stats_out, RETURN_STATS)


# ---------------------------------------------------------------------------------------
# Launchers.

def _log_or_ninf(x: float) -> float:
    return math.log(x) if x > 0.0 else float("-inf")


def launch_shape(vocab_size: int, k: int):
    """(BLOCK, K_BLOCK, num_warps): the sweeps' columns per iteration (the dense kernels'
    multi-block width, smaller for short rows) and the support's slots, a power of two."""
    block = min(triton.next_power_of_2(max(vocab_size, 1)), launch.BLOCK_OVERRIDE or MULTI_BLOCK)
    k_block = max(MIN_K_BLOCK, triton.next_power_of_2(max(k, 1)))
    return block, k_block, warps_for(block)


def _launch(student, ids, logprobs, labels, grad_scale, k, grad, stats_out=None):
    """The kernel; with stats_out ([N, STATS_WIDTH] fp32) the per-token diagnostics too."""
    n = student.shape[0]
    loss = torch.empty((n,), dtype=torch.float32, device=student.device)
    if n == 0:
        return loss
    divergence = resolve_divergence(k.divergence, k.beta)
    tail = TAILS[k.tail_id]
    ce = ce_mode(k)  # the T = 1 statistics, of the CE term or the z-loss
    opts, xo = logit_options(k)
    # renorm without CE needs no full-row statistic; the diagnostics do (argmax, H(q), Q).
    sweep = tail != "renorm" or ce != CE_NONE or stats_out is not None
    K = ids.shape[1]
    block, k_block, warps = launch_shape(k.vocab_size, K)
    inv_t = float(k.inv_temperature)
    programs = min(n, launch.SPARSE_PROGRAMS or n)
    # Per program, the support ids of its row in increasing order (the sweep's exclusion list).
    sorted_ids = torch.empty((programs, k_block) if sweep else (1,), dtype=torch.int32, device=student.device)
    with kernel_launch(student.device):
        sparse_kd_forward_kernel[(programs,)](
            student, grad, ids, logprobs, sorted_ids, loss, labels if labels is not None else loss, grad_scale,
            n, student.stride(0), grad.stride(0), ids.stride(0), logprobs.stride(0), K, k.vocab_size, grad.shape[1],
            1.4426950408889634 * inv_t, inv_t, 1.0 / inv_t, float(k.beta), _log_or_ninf(k.beta), _log_or_ninf(1.0 - k.beta),
            float(k.div_weight), float(k.ce_weight), int(k.ignore_index), *xo,
            DIVERGENCE=DIVERGENCE_IDS[divergence], TAIL=TAIL_IDS[tail], HAS_LABELS=labels is not None, CE=ce,
            SWEEP=sweep, BLOCK=block, K_BLOCK=k_block, PERSISTENT=programs < n, OPTS=opts,
            STATS_OUT=stats_out, RETURN_STATS=stats_out is not None, num_warps=warps,
        )
    return loss


def forward(student, ids, logprobs, labels, grad_scale, k: SparseKernelSettings):
    """(loss [N] fp32, grad) with the gradient in a new tensor of the student's dtype."""
    check_sparse_operator_args(student, ids, logprobs, labels, grad_scale, k, SUPPORTED_DTYPES)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    return _launch(student, ids, logprobs, labels, grad_scale, k, grad), grad


def forward_inplace(student, ids, logprobs, labels, grad_scale, k: SparseKernelSettings):
    """loss [N] fp32, the gradient written over ``student``: each program gathers its
    row's support logits and the label's before its first store."""
    check_sparse_operator_args(student, ids, logprobs, labels, grad_scale, k, SUPPORTED_DTYPES)
    return _launch(student, ids, logprobs, labels, grad_scale, k, student)


def forward_stats(student, ids, logprobs, labels, grad_scale, k: SparseKernelSettings):
    """(loss [N] fp32, grad, stats [N, STATS_WIDTH] fp32): ``forward`` with the per-token
    diagnostics (fastkd/backends/__init__.py: the stats table; column 0 P, column 4 Q)."""
    check_sparse_operator_args(student, ids, logprobs, labels, grad_scale, k, SUPPORTED_DTYPES)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    stats = torch.empty((student.shape[0], STATS_WIDTH), dtype=torch.float32, device=student.device)
    return _launch(student, ids, logprobs, labels, grad_scale, k, grad, stats), grad, stats


def forward_stats_inplace(student, ids, logprobs, labels, grad_scale, k: SparseKernelSettings):
    """(loss [N] fp32, stats): ``forward_inplace`` with the per-token diagnostics (the
    student's argmax is taken in row_stats, before any store to the row)."""
    check_sparse_operator_args(student, ids, logprobs, labels, grad_scale, k, SUPPORTED_DTYPES)
    stats = torch.empty((student.shape[0], STATS_WIDTH), dtype=torch.float32, device=student.device)
    return _launch(student, ids, logprobs, labels, grad_scale, k, student, stats), stats
