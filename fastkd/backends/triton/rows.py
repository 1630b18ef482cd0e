"""Row machinery shared by every Triton kernel: one program per row (token).

Each kernel works in the three phases that carry the same names in every backend:

    row_stats   per row and side: max and sum-exp of s/T and t/T, plus the T = 1 sum-exp of
                s for the CE term (``row_stats_sweep``: one read of the row; ``row_stats_block``:
                a row already in registers). Stored as ROW_STATS_WIDTH floats per row.
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

from .. import ROW_STATS_WIDTH  # noqa: F401  (the layout every backend shares)


def _interpreting() -> bool:
    """Whether @triton.jit builds interpreter objects (decided now, at import, as triton does)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.3
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRETED = tl.constexpr(_interpreting())
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# CE modes (constexpr): no CE term; CE at T == 1 (its softmax is the student's own, so the
# statistics are shared); CE at T != 1 (a third running sum-exp, of the raw logits).
CE_NONE, CE_SHARED, CE_RAW = 0, 1, 2



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
def load_pair(s_row, t_row, cols, V):
    # Columns past V read as -inf: zero probability, nothing added to any sum. Cast to fp32
    # right after loading (the interpreter keeps bf16 as raw bits).
    live = cols < V
    s = tl.load(s_row + cols, mask=live, other=float("-inf")).to(tl.float32)
    t = tl.load(t_row + cols, mask=live, other=float("-inf")).to(tl.float32)
    return s, t


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
def load_block(s_base, t_base, start, lead, V, BLOCK: tl.constexpr, PEEL: tl.constexpr):
    """(s, t, cols) of the block at position ``start`` of a sweep. Without PEEL lead is 0
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
        s = tl.where(live, tl.load(s_base + p, mask=granules).to(tl.float32), float("-inf"))
        t = tl.where(live, tl.load(t_base + p, mask=granules).to(tl.float32), float("-inf"))
    else:
        s, t = load_pair(s_base, t_base, cols, V)
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
def row_stats_sweep(s_base, t_base, lead, begin, end, V, c, inv_temperature, temperature,
                    BLOCK: tl.constexpr, RAW: tl.constexpr, PEEL: tl.constexpr):
    """row_stats in one read of the row: max and sum-exp of s/T and t/T (and of s, when RAW).

    Returns raw maxes (logit units) and sums anchored as in :func:`anchors`. The sums are
    per-lane vectors, rescaled by one scalar factor when the block max moves: one exp2
    per element per side, one cross-warp reduction (the max) per block. ``s_base``,
    ``t_base`` and ``lead``: the row's frame (``aligned_base``, ``row_lead``); the blocks at
    positions [begin, end) of it: 0 and V + lead for the whole row, a range of whole blocks
    for one split of it (dense.py's split path).
    """
    m_s = float("-inf")
    m_t = float("-inf")
    a_s = float("-inf")
    a_t = float("-inf")
    a_r = float("-inf")
    z_s = tl.zeros([BLOCK], dtype=tl.float32)
    z_t = tl.zeros([BLOCK], dtype=tl.float32)
    z_r = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(begin, end, BLOCK):
        s, t, _ = load_block(s_base, t_base, start, lead, V, BLOCK, PEEL)
        m_s = tl.maximum(m_s, tl.max(s, axis=0))
        m_t = tl.maximum(m_t, tl.max(t, axis=0))
        n_s, n_t, n_r = anchors(m_s, m_t, inv_temperature, temperature)
        # exp2(old - new) is 0 while the old anchor is -inf, 1 when the max did not move.
        z_s = z_s * tl.exp2(a_s - anchor(n_s)) + tl.exp2(s * c - anchor(n_s))
        z_t = z_t * tl.exp2(a_t - anchor(n_t)) + tl.exp2(t * c - anchor(n_t))
        if RAW:
            z_r = z_r * tl.exp2(a_r - anchor(n_r)) + tl.exp2(s * LOG2E - anchor(n_r))
        a_s, a_t, a_r = n_s, n_t, n_r
    return m_s, tl.sum(z_s, axis=0), m_t, tl.sum(z_t, axis=0), tl.sum(z_r, axis=0)


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
def grad_values(cols, V, s, w, gdiv, label, lse2_raw, gce, CE: tl.constexpr):
    """ds = gdiv * dD/d(s/T) (+ gce * (softmax(s) - onehot)), 0 past V, in fp32."""
    g = gdiv * w
    if CE != 0:
        sm = tl.exp2(s * LOG2E - lse2_raw)
        # The one-hot part is added in fp32, so the label entry is rounded once.
        g += gce * tl.where(cols == label, sm - 1.0, sm)
    return tl.where(cols < V, g, 0.0)


@triton.jit
def write_grad(g_row, cols, V, g_width, s, w, gdiv, label, lse2_raw, gce, CE: tl.constexpr):
    """The gradient (``grad_values``) of columns ``cols``, in the student dtype."""
    g = grad_values(cols, V, s, w, gdiv, label, lse2_raw, gce, CE)
    tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=cols < g_width)


@triton.jit
def write_grad_block(g_base, start, cols, V, g_width, s, w, gdiv, label, lse2_raw, gce,
                     CE: tl.constexpr, BLOCK: tl.constexpr, PEEL: tl.constexpr):
    """write_grad of the block at position ``start`` of a sweep (``load_block`` gave its
    ``cols``). Peeled, the stores keep exact masks (a store may not touch a neighbour's
    columns; the head block's columns start below 0), so they are not vectorised: an
    unmasked store for the full blocks in a branch of its own spilled the JSD build. The
    frame's aligned base still gives the stores the loads' layout (addressed by column
    alone they went through shared memory)."""
    if PEEL:
        g = grad_values(cols, V, s, w, gdiv, label, lse2_raw, gce, CE)
        p = start + tl.arange(0, BLOCK)
        tl.store(g_base + p, g.to(g_base.dtype.element_ty), mask=(cols >= 0) & (cols < g_width))
    else:
        write_grad(g_base, cols, V, g_width, s, w, gdiv, label, lse2_raw, gce, CE)


@triton.jit
def fill_row(g_row, start, g_width, value, BLOCK: tl.constexpr):
    """Columns [start, g_width) of a gradient row set to ``value`` (0, or NaN for a bad label)."""
    cols = tl.arange(0, BLOCK)
    fill = tl.zeros([BLOCK], dtype=tl.float32) + value
    for off in range(start, g_width, BLOCK):
        tl.store(g_row + off + cols, fill.to(g_row.dtype.element_ty), mask=off + cols < g_width)
