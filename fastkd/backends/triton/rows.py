"""Row machinery shared by every Triton kernel: one program per row (token).

Each kernel works in the three phases that carry the same names in every backend:

    row_stats   per row and side: max and sum-exp of s/T and t/T, plus the T = 1 sum-exp of
                s for the CE term or the z-loss (``row_stats_sweep``: one read of the row;
                ``row_stats_block``: a row already in registers). Stored as ROW_STATS_WIDTH
                floats per row.
    row_sums    per row, given the stats: the divergence value and the sums its gradient
                needs (the divergence's own terms live with its kernel; the block sums and
                their fp32 / fp64 accumulation across blocks are ``sum4`` / ``add_block_sums``)
    write_grad  per element: the gradient times the reduction's scale, in the student's
                dtype, zero past vocab_size (``write_grad``, ``fill_row``)

Logarithms are in base 2: with c = log2(e)/T, x = s*c is s/T in bits, so each exponential
is one exp2 of one FMA (``exp2(s*c - lse2)``). Exponentials are anchored at
A = (max * 1/T) * log2(e), rounded exactly as a caller's external row_stats (max in s/T
units) would be, so internal and external statistics give bitwise the same result; a max
of -inf (every entry masked) anchors at 0, since exp2(-inf - -inf) is NaN.

Row offsets are int64 (row * stride), so N*V > 2^31 works.

The logit options (csrc/kd_params.h states their contract) reach every kernel as OPTS, a
constexpr set of the bits below that the launcher picks (launch.logit_options), and XO, a
tuple of fp32 scalars. The loads transform each side at once (``load_pair``, ``load_block``:
s' = m s, or c tanh(m s / c) with a softcap; ``tanh``), so every phase after them works on
s' and t' as it worked on s and t; write_grad multiplies by the chain factor ds'/ds
(``student_chain``) and adds the label-smoothed CE and z-loss terms (``hard_label_grad``).
OPTS = 0 compiles each kernel as it was before the options: every use is behind a
constexpr test.

Peeled rows (multi block, PEEL > 0): a row that does not start on 16 bytes (odd V: 50257,
32001) loses vector loads, since the compiler vectorises only what it can prove aligned,
and a column mask ``cols < V`` at odd V is not constant over a vector. Its sweeps then
run in a frame shifted back by the row's ``lead`` (its columns past the last 16-byte
boundary, ``row_lead``): position p = column + lead, blocks at multiples of BLOCK from a
base hinted 16-byte aligned (``aligned_base``). Loads are masked by whole 16-byte
granules, a mask the compiler proves constant per vector, and the entries of the row's
first and last granule that lie outside the row are set to -inf (``load_block``). Stores
keep exact column masks (``write_grad_block``). The launcher peels only where one lead
aligns the student, the teacher and the gradient (launch.peel_columns); elsewhere PEEL = 0,
lead = 0 and the sweeps are the plain masked loop.
"""
import os

import triton
import triton.language as tl

from .. import ROW_STATS_WIDTH, STATS_WIDTH  # noqa: F401  (the layouts every backend shares)


def _interpreting() -> bool:
    """Whether @triton.jit builds interpreter objects (decided now, at import, as triton does)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.3
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRETED = tl.constexpr(_interpreting())
_STATS_WIDTH = tl.constexpr(STATS_WIDTH)
NO_COLUMN = tl.constexpr(2 ** 31 - 1)  # no argmax column (first_max_column of a NaN maximum)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# CE modes (constexpr): the T = 1 statistics of the CE term (or of the z-loss, OPT_ZLOSS):
# none; at T == 1 (its softmax is the student's own, so the statistics are shared); at
# T != 1 (a third running sum-exp, of the raw logits).
CE_NONE, CE_SHARED, CE_RAW = 0, 1, 2

# OPTS bits (constexpr). The student's transform is OPTS & 3, the teacher's (OPTS >> 2) & 3:
# 0 none, X_SCALE x' = m x, X_CAP x' = c tanh(m x / c).
X_SCALE, X_CAP = 1, 2
TRANSFORMS = 15  # both sides' transform bits (what a kernel that reads no T = 1 term takes)
OPT_SMOOTH = 16  # label smoothing on the CE term (shard_row_stats: the sum of s', column 6)
OPT_ZLOSS = 32   # the z-loss: lambda lse(s')^2, with the T = 1 statistics (CE mode != CE_NONE)
OPT_NO_CE = 64   # the T = 1 statistics serve the z-loss alone: no CE term (ce_weight == 0)
_X_SCALE = tl.constexpr(X_SCALE)
_X_CAP = tl.constexpr(X_CAP)
_SMOOTH = tl.constexpr(OPT_SMOOTH)
_ZLOSS = tl.constexpr(OPT_ZLOSS)
_NO_CE = tl.constexpr(OPT_NO_CE)
_HARD_OPTS = tl.constexpr(OPT_SMOOTH | OPT_ZLOSS)
# XO, the options' scalars (launch.logit_options), by position: the student's multiplier
# (m, or m / c with a cap), cap c, scale m and 1 / c; the teacher's multiplier and cap; the
# CE term's 1 - epsilon and epsilon / V (V the whole vocabulary's classes); lambda. A tuple
# inside the kernels; the kernels take them as their last scalar arguments, s_mul .. z_loss.


# ---------------------------------------------------------------------------------------
# The logit transforms.

# tanh(x) = x + x^3 (c3 + x^2 (c5 + ...)) below _TANH_SERIES (its Taylor series to x^15:
# truncation under 2e-8 relative there), 1 - 2 / (e^(2|x|) + 1) above it (rounding of 2 / (e + 1)
# grows as 1 / tanh: under 2e-7 relative from 0.55 on). Measured against float64 in an fp32
# emulation over [1e-6, 3]: 2.0e-7 relative at most.
_TANH_SERIES = tl.constexpr(0.55)
_T3 = tl.constexpr(-1.0 / 3.0)
_T5 = tl.constexpr(2.0 / 15.0)
_T7 = tl.constexpr(-17.0 / 315.0)
_T9 = tl.constexpr(62.0 / 2835.0)
_T11 = tl.constexpr(-1382.0 / 155925.0)
_T13 = tl.constexpr(21844.0 / 6081075.0)
_T15 = tl.constexpr(-929569.0 / 638512875.0)


@triton.jit
def tanh(x):
    """tanh in fp32 from one exp2 (the kernels' fast exponential): NaN stays NaN, |x| -> inf
    saturates at +-1 (2 / inf = 0: no inf / inf), tanh(-inf) = -1."""
    a = tl.abs(x)
    x2 = x * x
    series = x + x * x2 * (_T3 + x2 * (_T5 + x2 * (_T7 + x2 * (_T9 + x2 * (_T11 + x2 * (_T13 + x2 * _T15))))))
    far = 1.0 - 2.0 / (tl.exp2(a * (2.0 * LOG2E)) + 1.0)
    return tl.where(a < _TANH_SERIES, series, tl.where(x < 0.0, -far, far))


@triton.jit
def transform(x, live, mul, cap, MODE: tl.constexpr):
    """One side's logit transform of loaded values: x for MODE 0, mul x (X_SCALE: mul = m),
    cap tanh(mul x) (X_CAP: mul = m / c). Entries outside the row (not ``live``, loaded as
    -inf) stay -inf under the cap, which would make them -c; a -inf logit of the row
    becomes -c (finite), as c tanh(-inf) is."""
    if MODE == _X_CAP:
        return tl.where(live, cap * tanh(x * mul), float("-inf"))
    elif MODE == _X_SCALE:
        return x * mul
    else:
        return x


@triton.jit
def student_x(x, live, xo, OPTS: tl.constexpr):
    """s' of loaded student logits (``transform``)."""
    return transform(x, live, xo[0], xo[1], OPTS & 3)


@triton.jit
def teacher_x(x, live, xo, OPTS: tl.constexpr):
    """t' of loaded teacher logits (``transform``)."""
    return transform(x, live, xo[4], xo[5], (OPTS >> 2) & 3)


@triton.jit
def student_chain(g, s, xo, OPTS: tl.constexpr):
    """dL/ds from dL/ds' at s': times m (1 - (s'/c)^2) under a cap, m without one. (Past
    the row s' is -inf and this NaN: the caller's column select drops it.)"""
    MODE: tl.constexpr = OPTS & 3
    if MODE == _X_CAP:
        u = s * xo[3]  # tanh(m s / c)
        return g * (xo[2] - xo[2] * (u * u))
    elif MODE == _X_SCALE:
        return g * xo[2]
    else:
        return g


# ---------------------------------------------------------------------------------------
# Addressing and loads.

@triton.jit
def row_offset(row, stride):
    # int64 before the multiply: row * stride exceeds 2^31 at 16384 x 151936.
    return row.to(tl.int64) * stride


@triton.jit
def row_base(ptr, row, stride):
    return ptr + row_offset(row, stride)


@triton.jit
def load_pair(s_row, t_row, cols, V, xo, OPTS: tl.constexpr):
    # Columns past V read as -inf: zero probability, nothing added to any sum. Cast to fp32
    # right after loading (the interpreter keeps bf16 as raw bits); then s' and t'.
    live = cols < V
    s = tl.load(s_row + cols, mask=live, other=float("-inf")).to(tl.float32)
    t = tl.load(t_row + cols, mask=live, other=float("-inf")).to(tl.float32)
    return student_x(s, live, xo, OPTS), teacher_x(t, live, xo, OPTS)


@triton.jit
def row_lead(lead0, row, stride, PEEL: tl.constexpr):
    """Columns by which a row starts past a PEEL-column (16-byte) boundary: (lead of row 0
    + row * stride) mod PEEL; 0 without PEEL."""
    if PEEL:
        # int32 from here: the columns of a peeled block stay 32-bit (int64 ones doubled
        # the registers of every index and mask).
        return ((lead0 + row_offset(row, stride)) % PEEL).to(tl.int32)
    else:
        return 0


@triton.jit
def aligned_base(row_ptr, lead, PEEL: tl.constexpr):
    """The row's peeled frame: the pointer ``lead`` columns before the row, on 16 bytes
    (the launcher checked it is) and so hinted; the row itself without PEEL."""
    if PEEL:
        return tl.multiple_of(row_ptr - lead, 16)
    else:
        return row_ptr


@triton.jit
def load_block(s_base, t_base, start, lead, V, xo, BLOCK: tl.constexpr, PEEL: tl.constexpr, OPTS: tl.constexpr):
    """(s', t', cols) of the block at position ``start`` of a sweep. Without PEEL lead is 0
    and this is ``load_pair`` of columns start + arange. Peeled, the loads are masked by
    whole 16-byte granules (a granule is read when it holds a column of the row), which
    the compiler proves constant per granule and so loads as 16-byte vectors; the entries
    of those granules outside the row (at most PEEL - 1 before it and after it, in the
    row's own first and last granules, never across a page) are then set to -inf."""
    p = start + tl.arange(0, BLOCK)
    cols = p - lead
    if PEEL:
        granules = p < tl.multiple_of((V + lead + PEEL - 1) // PEEL * PEEL, PEEL)
        live = (cols >= 0) & (cols < V)
        s = tl.where(live, student_x(tl.load(s_base + p, mask=granules).to(tl.float32), True, xo, OPTS),
                     float("-inf"))
        t = tl.where(live, teacher_x(tl.load(t_base + p, mask=granules).to(tl.float32), True, xo, OPTS),
                     float("-inf"))
    else:
        s, t = load_pair(s_base, t_base, cols, V, xo, OPTS)
    return s, t, cols


def kernels_interpreted() -> bool:
    """True when the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(row_offset, triton.runtime.JITFunction)


# ---------------------------------------------------------------------------------------
# row_stats: anchors, the one-read sweep, a row in registers.

@triton.jit
def anchor(a):
    # exp2 anchor (in bits); a row whose max is still -inf is all -inf (zero mass): anchor
    # at 0, since exp2(-inf - -inf) would be NaN.
    return tl.where(a == float("-inf"), 0.0, a)


@triton.jit
def anchors(m_s, m_t, inv_temperature, temperature):
    """Anchors (bits) of the student, teacher and raw-student exponentials for raw maxes.

    Rounded exactly as from external row_stats (maxes in s/T units): A = (m/T) * log2(e).
    """
    ms_nat = m_s * inv_temperature
    a_s = ms_nat * LOG2E
    a_t = (m_t * inv_temperature) * LOG2E
    a_r = (temperature * ms_nat) * LOG2E
    return a_s, a_t, a_r


@triton.jit
def row_stats_sweep(s_base, t_base, lead, begin, end, V, c, inv_temperature, temperature, xo,
                    BLOCK: tl.constexpr, RAW: tl.constexpr, PEEL: tl.constexpr, OPTS: tl.constexpr):
    """row_stats in one read of the row: max and sum-exp of s/T and t/T (and of s, when RAW),
    s and t the transformed logits (``load_block``).

    Returns raw maxes (logit units) and sums anchored as in :func:`anchors`. The sums are
    per-lane vectors, rescaled by one scalar factor when the block max moves: one exp2
    per element per side, one cross-warp reduction (the max) per block. ``s_base``,
    ``t_base`` and ``lead``: the row's frame (``aligned_base``, ``row_lead``); the blocks at
    positions [begin, end) of it: 0 and V + lead for the whole row, a range of whole blocks
    for one split of it (dense.py's split path).
    """
    m_s, z_s, m_t, z_t, z_r, _, _ = row_stats_sweep_top1(s_base, t_base, lead, begin, end, V, c, inv_temperature,
                                                         temperature, xo, BLOCK, RAW, PEEL, OPTS, False)
    return m_s, z_s, m_t, z_t, z_r


@triton.jit
def row_stats_sweep_top1(s_base, t_base, lead, begin, end, V, c, inv_temperature, temperature, xo,
                         BLOCK: tl.constexpr, RAW: tl.constexpr, PEEL: tl.constexpr, OPTS: tl.constexpr,
                         TOP1: tl.constexpr):
    """``row_stats_sweep``, and with TOP1 each side's argmax column (the per-token
    diagnostics' top-1 agreement): (m_s, z_s, m_t, z_t, z_r, col_s, col_t), the columns 0
    without TOP1. Per block, the first column holding the block's max (``first_max_column``),
    taken only when that max is strictly greater than the running one, so equal maxima in a
    later block keep the earlier (lower) column: torch.argmax's rule. A row whose entries
    are all -inf keeps column 0, as torch's."""
    m_s = float("-inf")
    m_t = float("-inf")
    a_s = float("-inf")
    a_t = float("-inf")
    a_r = float("-inf")
    col_s = 0
    col_t = 0
    z_s = tl.zeros([BLOCK], dtype=tl.float32)
    z_t = tl.zeros([BLOCK], dtype=tl.float32)
    z_r = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(begin, end, BLOCK):
        s, t, cols = load_block(s_base, t_base, start, lead, V, xo, BLOCK, PEEL, OPTS)
        if TOP1:
            b_s = tl.max(s, axis=0)
            b_t = tl.max(t, axis=0)
            col_s = tl.where(b_s > m_s, first_max_column(s, b_s, cols), col_s)
            col_t = tl.where(b_t > m_t, first_max_column(t, b_t, cols), col_t)
            m_s = tl.maximum(m_s, b_s)
            m_t = tl.maximum(m_t, b_t)
        else:
            m_s = tl.maximum(m_s, tl.max(s, axis=0))
            m_t = tl.maximum(m_t, tl.max(t, axis=0))
        n_s, n_t, n_r = anchors(m_s, m_t, inv_temperature, temperature)
        # exp2(old - new) is 0 while the old anchor is -inf, 1 when the max did not move.
        z_s = z_s * tl.exp2(a_s - anchor(n_s)) + tl.exp2(s * c - anchor(n_s))
        z_t = z_t * tl.exp2(a_t - anchor(n_t)) + tl.exp2(t * c - anchor(n_t))
        if RAW:
            z_r = z_r * tl.exp2(a_r - anchor(n_r)) + tl.exp2(s * LOG2E - anchor(n_r))
        a_s, a_t, a_r = n_s, n_t, n_r
    return m_s, tl.sum(z_s, axis=0), m_t, tl.sum(z_t, axis=0), tl.sum(z_r, axis=0), col_s, col_t


@triton.jit
def row_stats_block(s, t, c, inv_temperature, temperature, RAW: tl.constexpr):
    """row_stats of a row already in registers (single-block path), as the sweep gives them."""
    m_s = tl.max(s, axis=0)
    m_t = tl.max(t, axis=0)
    a_s, a_t, a_r = anchors(m_s, m_t, inv_temperature, temperature)
    z_s = tl.sum(tl.exp2(s * c - anchor(a_s)), axis=0)
    z_t = tl.sum(tl.exp2(t * c - anchor(a_t)), axis=0)
    z_r = 0.0
    if RAW:
        z_r = tl.sum(tl.exp2(s * LOG2E - anchor(a_r)), axis=0)
    return m_s, z_s, m_t, z_t, z_r


# ---------------------------------------------------------------------------------------
# row_sums: block sums, and their accumulation across the blocks of a row.

# Typed zeros to start running sums that a helper carries through its loop (a literal 0.0
# argument is a constexpr there, which a loop cannot carry).
@triton.jit
def zero32():
    return tl.full((), 0.0, tl.float32)


@triton.jit
def zero64():
    return tl.full((), 0.0, tl.float64)


@triton.jit
def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def sum4(a, b, c, d):
    """Four block sums. Compiled, one joint reduction: one round of shuffles and one
    barrier instead of four. The interpreter runs a custom-combine reduction element by
    element in Python (ten times slower than the whole kernel), so there: four tl.sum."""
    if INTERPRETED:
        return tl.sum(a, axis=0), tl.sum(b, axis=0), tl.sum(c, axis=0), tl.sum(d, axis=0)
    else:
        return tl.reduce((a, b, c, d), 0, _add4)


@triton.jit
def add_block_sums(acc0, acc1, acc2, acc3, x0, x1, x2, x3):
    """acc_i + sum(x_i) over one block: the four sums in one joint reduction (``sum4``), each
    added to its running sum in that sum's precision (fp32 from ``zero32``, or fp64 from
    ``zero64``: one fp64 add per sum per block)."""
    b0, b1, b2, b3 = sum4(x0, x1, x2, x3)
    return acc0 + b0, acc1 + b1, acc2 + b2, acc3 + b3


# ---------------------------------------------------------------------------------------
# write_grad.

@triton.jit
def hard_label_grads(gce, scale, lse2_raw, xo, OPTS: tl.constexpr):
    """The row constants of the T = 1 terms' gradient, gh = (g_ce, g_raw, g_label, g_smooth),
    all times the reduction's scale: without label smoothing or z-loss only g_ce = scale
    ce_weight is read; with them dL/ds'_i holds g_raw softmax(s')_i - g_label [i = y] - g_smooth,
    g_raw = scale (ce_weight + 2 lambda lse(s')), g_label = g_ce (1 - eps), g_smooth = g_ce eps / V.
    (``gce`` is 0 where the z-loss runs alone.)"""
    if (_ZLOSS & OPTS) != 0:
        g_raw = gce + (2.0 * scale) * (xo[8] * (lse2_raw * LN2))
    else:
        g_raw = gce
    if (_SMOOTH & OPTS) != 0:
        g_label = gce * xo[6]
        g_smooth = gce * xo[7]
    else:
        g_label = gce
        g_smooth = 0.0
    return gce, g_raw, g_label, g_smooth


@triton.jit
def hard_label_grad(g, cols, label, sm, gh, OPTS: tl.constexpr):
    """g plus the T = 1 terms' gradient at columns ``cols`` (``hard_label_grads``; sm the
    T = 1 softmax there)."""
    if (_HARD_OPTS & OPTS) != 0:
        return g + (gh[1] * sm - tl.where(cols == label, gh[2], 0.0) - gh[3])
    else:
        # The one-hot part is added in fp32, so the label entry is rounded once.
        return g + gh[0] * tl.where(cols == label, sm - 1.0, sm)


@triton.jit
def hard_label_loss(lse2_raw, s_label, sum_s, ce_weight, xo, CE_TERM: tl.constexpr, OPTS: tl.constexpr):
    """The T = 1 terms of a row's loss (s' units): ce_weight (lse - (1 - eps) s'_y - eps/V
    sum s') where CE_TERM, plus lambda lse^2 (OPT_ZLOSS); ``sum_s`` is read with OPT_SMOOTH."""
    lse = lse2_raw * LN2
    out = 0.0
    if CE_TERM:
        if (_SMOOTH & OPTS) != 0:
            out = ce_weight * (lse - xo[6] * s_label - xo[7] * sum_s)
        else:
            out = ce_weight * (lse - s_label)
    if (_ZLOSS & OPTS) != 0:
        out += xo[8] * (lse * lse)
    return out


@triton.jit
def grad_values(cols, V, s, w, gdiv, label, lse2_raw, gh, xo, CE: tl.constexpr, OPTS: tl.constexpr):
    """ds = gdiv * dD/d(s'/T) (+ the T = 1 terms: ``hard_label_grad``), times ds'/ds
    (``student_chain``), 0 past V, in fp32; s holds s'."""
    g = gdiv * w
    if CE != 0:
        sm = tl.exp2(s * LOG2E - lse2_raw)
        g = hard_label_grad(g, cols, label, sm, gh, OPTS)
    g = student_chain(g, s, xo, OPTS)
    return tl.where(cols < V, g, 0.0)


@triton.jit
def write_grad(g_row, cols, V, g_width, s, w, gdiv, label, lse2_raw, gh, xo, CE: tl.constexpr, OPTS: tl.constexpr):
    """The gradient (``grad_values``) of columns ``cols``, in the student dtype."""
    g = grad_values(cols, V, s, w, gdiv, label, lse2_raw, gh, xo, CE, OPTS)
    tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=cols < g_width)


@triton.jit
def write_grad_block(g_base, start, cols, V, g_width, s, w, gdiv, label, lse2_raw, gh, xo,
                     CE: tl.constexpr, BLOCK: tl.constexpr, PEEL: tl.constexpr, OPTS: tl.constexpr):
    """write_grad of the block at position ``start`` of a sweep (``load_block`` gave its
    ``cols``). Peeled, the stores keep exact masks (a store may not touch a neighbour's
    columns; the head block's columns start below 0), so they are not vectorised: an
    unmasked store for the full blocks in a branch of its own spilled the JSD build. The
    frame's aligned base still gives the stores the loads' layout (addressed by column
    alone they went through shared memory)."""
    if PEEL:
        g = grad_values(cols, V, s, w, gdiv, label, lse2_raw, gh, xo, CE, OPTS)
        p = start + tl.arange(0, BLOCK)
        tl.store(g_base + p, g.to(g_base.dtype.element_ty), mask=(cols >= 0) & (cols < g_width))
    else:
        write_grad(g_base, cols, V, g_width, s, w, gdiv, label, lse2_raw, gh, xo, CE, OPTS)


@triton.jit
def fill_row(g_row, start, g_width, value, BLOCK: tl.constexpr):
    """Columns [start, g_width) of a gradient row set to ``value`` (0, or NaN for a bad label)."""
    cols = tl.arange(0, BLOCK)
    fill = tl.zeros([BLOCK], dtype=tl.float32) + value
    for off in range(start, g_width, BLOCK):
        tl.store(g_row + off + cols, fill.to(g_row.dtype.element_ty), mask=off + cols < g_width)


# ---------------------------------------------------------------------------------------
# The per-token diagnostics (return_stats=True; fastkd/backends/__init__.py: the stats
# table), written by a kernel when its RETURN_STATS constexpr is on. Off, every use is
# behind that constexpr and the kernels compile as without it (their STATS_OUT pointer is
# None: a constexpr, not a parameter).

@triton.jit
def entropy_terms(x, lse2):
    """Per element p log2 p, p = 2^(x - lse2), for logits ``x`` already in bits (s c or t c),
    with 0 log 0 = 0: minus LN2 times their row sum is the entropy in nats. log2 p and p are
    the ones the divergence terms form (the same FMA and exp2: the compiler shares them), so
    this adds one multiply and one select per element (and the teacher's exp2 for reverse
    KL, which forms no p). Not lse - sum p b, the same sum rearranged: that adds the fp32
    mass's rounding (1 - sum p) times lse, and cancels where the row is peaked."""
    lx = x - lse2
    px = tl.exp2(lx)
    return tl.where(px == 0.0, 0.0, px * lx)


@triton.jit
def first_max_column(x, m, cols):
    """The first of ``cols`` where ``x`` holds its maximum ``m`` (torch.argmax's rule among
    equal maxima), NO_COLUMN where none does (a NaN maximum). From the max the caller has:
    one compare and select per element and an int min, where a max with indices would
    carry the index through every step of the reduction."""
    return tl.min(tl.where(x == m, cols, NO_COLUMN), axis=0)


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def sum_pair(a, b):
    """Two block sums in one joint reduction compiled (``sum4``), two tl.sum interpreted."""
    if INTERPRETED:
        return tl.sum(a, axis=0), tl.sum(b, axis=0)
    else:
        return tl.reduce((a, b), 0, _add2)


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def sum3(a, b, c):
    """Three block sums in one joint reduction (``sum_pair``)."""
    if INTERPRETED:
        return tl.sum(a, axis=0), tl.sum(b, axis=0), tl.sum(c, axis=0)
    else:
        return tl.reduce((a, b, c), 0, _add3)


@triton.jit
def store_stats(out, col0, h_q, agree, divergence, col4):
    """One row of the stats table at ``out`` (STATS_WIDTH fp32): H(p) or P, H(q), agree (a
    bool, stored 1.0 / 0.0), D, 0 or Q."""
    # (tl.store converts each value to the table's fp32: numbers, fp64 and bools alike.)
    tl.store(out + 0, col0)
    tl.store(out + 1, h_q)
    tl.store(out + 2, agree)
    tl.store(out + 3, divergence)
    tl.store(out + 4, col4)


@triton.jit
def store_blank_stats(out):
    """The stats row of a row out of the loss (ignored; or marked NaN: a label outside [0, V),
    a bad sparse id): NaN, agreement 0."""
    nan = tl.full((), float("nan"), tl.float32)
    store_stats(out, nan, nan, zero32(), nan, nan)
