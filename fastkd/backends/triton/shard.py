"""The vocab-parallel loss's per-shard phases (fastkd/distributed) as Triton kernels.

The operators' contract is in fastkd/backends/__init__.py; per row of one rank's slice of
the vocabulary, with a = s/T, b = t/T:

    shard_row_stats   one read of the slice: max and sum-exp of a and b (and of s for the
                      CE term or the z-loss) against the slice's own maxima, and the value
                      term of forward KL, sum e^(b - max_t) (b - a), or of reverse KL,
                      sum e^(a - max_s) (a - b), accumulated online like the sums: a
                      per-lane vector rescaled when the block max moves; with label
                      smoothing, the sum of s over the slice's counted columns
    shard_row_sums    one read with the global statistics: the slice's part of JSD's or
                      TVD's row sums (dense.py's per-element terms, summed per block and
                      across blocks in fp64), converted from bits to nats
    shard_write_grad  dense.py's forward kernel with the caller's statistics and row sums
                      (HAS_STATS, HAS_SUMS) and the slice's labels (SHARD)

s and t are each side's transformed logits (the logit options: rows.py), a = s/T, b = t/T.
Everything is fp32 (the Triton backend takes fp32/bf16/fp16 logits).
"""
import torch
import triton
import triton.language as tl

from ...config import KernelSettings, resolve_divergence
from .. import ROW_STATS_WIDTH, ROW_SUMS_WIDTH, SHARD_STATS_WIDTH, check_operator_args
from . import dense, launch
from .dense import DIVERGENCE_IDS, SUPPORTED_DTYPES, _centred_sums, _centred_terms, _tvd_terms, kernel_scalars
from .launch import CE_NONE, CE_RAW, ce_mode, kernel_launch, logit_options, warps_for
from .rows import LN2, LOG2E, OPT_SMOOTH, anchor, anchors, load_block, row_base, zero64

_FORWARD_KL = tl.constexpr(DIVERGENCE_IDS["forward_kl"])
_REVERSE_KL = tl.constexpr(DIVERGENCE_IDS["reverse_kl"])
_TVD = tl.constexpr(DIVERGENCE_IDS["tvd"])
_STATS_WIDTH = tl.constexpr(SHARD_STATS_WIDTH)
_SUMS_WIDTH = tl.constexpr(ROW_SUMS_WIDTH)
_ROW_STATS_WIDTH = tl.constexpr(ROW_STATS_WIDTH)
_SMOOTH = tl.constexpr(OPT_SMOOTH)


@triton.jit
def _rescale(x, old_anchor, new_anchor):
    # exp2(old - new) is 0 while the old anchor is -inf, 1 when the max did not move.
    return x * tl.exp2(old_anchor - anchor(new_anchor))


@triton.jit
def _lane_total(z, lane_anchor, row_anchor):
    """A per-lane running sum moved from each lane's anchor to the row's, summed."""
    return tl.sum(tl.where(z == 0.0, 0.0, z * tl.exp2(lane_anchor - anchor(row_anchor))), axis=0)


@triton.jit
def shard_row_stats_kernel(S, T, OUT, s_stride, t_stride, V, c, inv_temperature, temperature,
                           s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss,
                           DIVERGENCE: tl.constexpr, RAW: tl.constexpr, SHARED: tl.constexpr,
                           BLOCK: tl.constexpr, OPTS: tl.constexpr):
    """[N, SHARD_STATS_WIDTH]: (max_s, sum_s, max_t, sum_t, sum_raw, value, sum of s) with
    maxima in s/T units. Per lane: its own running maxima (anchors in bits), its sums and
    the value term against them; the lanes are combined at the end. The sum of s (label
    smoothing's term, OPT_SMOOTH; else 0) is a plain per-lane sum."""
    xo = (s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss)
    row = tl.program_id(0).to(tl.int64)
    s_base = row_base(S, row, s_stride)
    t_base = row_base(T, row, t_stride)
    ninf = tl.full([BLOCK], float("-inf"), tl.float32)
    m_s, m_t = ninf, ninf  # per-lane raw maxima
    a_s, a_t, a_r = ninf, ninf, ninf
    z_s = tl.zeros([BLOCK], dtype=tl.float32)
    z_t = tl.zeros([BLOCK], dtype=tl.float32)
    z_r = tl.zeros([BLOCK], dtype=tl.float32)
    val = tl.zeros([BLOCK], dtype=tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        s, t, cols = load_block(s_base, t_base, start, 0, V, xo, BLOCK, 0, OPTS)
        if (_SMOOTH & OPTS) != 0:
            total += tl.where(cols < V, s, 0.0)
        m_s = tl.maximum(m_s, s)
        m_t = tl.maximum(m_t, t)
        n_s, n_t, n_r = anchors(m_s, m_t, inv_temperature, temperature)
        e_s = tl.exp2(s * c - anchor(n_s))
        e_t = tl.exp2(t * c - anchor(n_t))
        z_s = _rescale(z_s, a_s, n_s) + e_s
        z_t = _rescale(z_t, a_t, n_t) + e_t
        if RAW:
            z_r = _rescale(z_r, a_r, n_r) + tl.exp2(s * LOG2E - anchor(n_r))
        # (t - s) / T, 0 where the weight is 0 (-inf logits: 0 * inf).
        if DIVERGENCE == _FORWARD_KL:
            val = _rescale(val, a_t, n_t) + tl.where(e_t == 0.0, 0.0, e_t * ((t - s) * inv_temperature))
        elif DIVERGENCE == _REVERSE_KL:
            val = _rescale(val, a_s, n_s) + tl.where(e_s == 0.0, 0.0, e_s * ((s - t) * inv_temperature))
        a_s, a_t, a_r = n_s, n_t, n_r
    ms = tl.max(m_s, axis=0)
    mt = tl.max(m_t, axis=0)
    r_s, r_t, r_r = anchors(ms, mt, inv_temperature, temperature)
    out = OUT + row * _STATS_WIDTH
    tl.store(out + 0, ms * inv_temperature)
    sum_s = _lane_total(z_s, a_s, r_s)
    tl.store(out + 1, sum_s)
    tl.store(out + 2, mt * inv_temperature)
    tl.store(out + 3, _lane_total(z_t, a_t, r_t))
    if RAW:
        tl.store(out + 4, _lane_total(z_r, a_r, r_r))
    elif SHARED:
        tl.store(out + 4, sum_s)
    else:
        tl.store(out + 4, 0.0)
    if DIVERGENCE == _FORWARD_KL:
        tl.store(out + 5, _lane_total(val, a_t, r_t))
    elif DIVERGENCE == _REVERSE_KL:
        tl.store(out + 5, _lane_total(val, a_s, r_s))
    else:
        tl.store(out + 5, 0.0)
    if (_SMOOTH & OPTS) != 0:
        tl.store(out + 6, tl.sum(total, axis=0))
    else:
        tl.store(out + 6, 0.0)


@triton.jit
def shard_row_sums_kernel(S, T, STATS, OUT, s_stride, t_stride, V, c, log2_beta, log2_1mb,
                          s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss,
                          DIVERGENCE: tl.constexpr, BLOCK: tl.constexpr, OPTS: tl.constexpr):
    """[N, ROW_SUMS_WIDTH]: the slice's row sums given the global statistics (in the layout
    of backends/__init__.py, in nats)."""
    xo = (s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss)
    row = tl.program_id(0).to(tl.int64)
    s_base = row_base(S, row, s_stride)
    t_base = row_base(T, row, t_stride)
    stats = STATS + row * _ROW_STATS_WIDTH
    lse2_s = anchor(tl.load(stats + 0) * LOG2E) + tl.log2(tl.load(stats + 1))
    lse2_t = anchor(tl.load(stats + 2) * LOG2E) + tl.log2(tl.load(stats + 3))
    acc0, acc1, acc2, acc3, acc4 = zero64(), zero64(), zero64(), zero64(), zero64()
    for start in range(0, V, BLOCK):
        s, t, _ = load_block(s_base, t_base, start, 0, V, xo, BLOCK, 0, OPTS)
        if DIVERGENCE == _TVD:
            q, d, x0, x1, x2, x3 = _tvd_terms(s, t, c, lse2_s, lse2_t)
            x4 = tl.zeros_like(q)
        else:
            q, h, x4 = _centred_terms(s, t, c, lse2_s, lse2_t, log2_beta, log2_1mb, DIVERGENCE)
            x0, x1, x3, x2 = _centred_sums(q, h)  # (small q, small q h, big q h, big q)
        acc0 += tl.sum(x0, axis=0).to(tl.float64)
        acc1 += tl.sum(x1, axis=0).to(tl.float64)
        acc2 += tl.sum(x2, axis=0).to(tl.float64)
        acc3 += tl.sum(x3, axis=0).to(tl.float64)
        acc4 += tl.sum(x4, axis=0).to(tl.float64)
    out = OUT + row * _SUMS_WIDTH
    if DIVERGENCE == _TVD:
        tl.store(out + 0, acc0.to(tl.float32))
        tl.store(out + 1, acc1.to(tl.float32))
        tl.store(out + 2, acc2.to(tl.float32))
        tl.store(out + 3, acc3.to(tl.float32))
    else:  # q h and p (log p - log m) in bits -> nats
        tl.store(out + 0, acc0.to(tl.float32))
        tl.store(out + 1, (acc1 * LN2).to(tl.float32))
        tl.store(out + 2, acc2.to(tl.float32))
        tl.store(out + 3, (acc3 * LN2).to(tl.float32))
    tl.store(out + 4, (acc4 * LN2).to(tl.float32))


# ---------------------------------------------------------------------------------------
# Launchers.

def _block(vocab_size: int) -> int:
    return min(triton.next_power_of_2(vocab_size), launch.BLOCK_OVERRIDE or launch.MULTI_BLOCK)


def _check_table(name, x, student, width):
    if (x.dim() != 2 or tuple(x.shape) != (student.shape[0], width) or x.dtype != torch.float32
            or not x.is_contiguous() or x.device != student.device):
        raise ValueError(f"fastkd: {name} must be a contiguous float32 [N, {width}] tensor on the logits' device")


def row_stats(student, teacher, k: KernelSettings):
    check_operator_args(student, teacher, None, None, None, k, SUPPORTED_DTYPES)
    n = student.shape[0]
    out = torch.empty((n, SHARD_STATS_WIDTH), dtype=torch.float32, device=student.device)
    if n == 0:
        return out
    divergence = resolve_divergence(k.divergence, k.beta)
    c, inv_t, temp, _, _ = kernel_scalars(k.inv_temperature, 0.5)
    block = _block(k.vocab_size)
    raw = ce_mode(k)  # the T = 1 sum-exp for the CE term or the z-loss
    opts, xo = logit_options(k, row_stats_sum=True)
    with kernel_launch(student.device):
        shard_row_stats_kernel[(n,)](student, teacher, out, student.stride(0), teacher.stride(0), k.vocab_size, c,
                                     inv_t, temp, *xo, DIVERGENCE=DIVERGENCE_IDS[divergence],
                                     RAW=raw == CE_RAW, SHARED=raw != CE_NONE, BLOCK=block, OPTS=opts,
                                     num_warps=warps_for(block))
    return out


def row_sums(student, teacher, stats, k: KernelSettings):
    check_operator_args(student, teacher, None, None, None, k, SUPPORTED_DTYPES)
    _check_table("row_stats", stats, student, ROW_STATS_WIDTH)
    divergence = resolve_divergence(k.divergence, k.beta)
    if divergence == "forward_kl":
        raise ValueError("fastkd: shard_row_sums is for reverse_kl, jsd and tvd (forward KL's gradient needs no row sums)")
    n = student.shape[0]
    out = torch.empty((n, ROW_SUMS_WIDTH), dtype=torch.float32, device=student.device)
    if n == 0:
        return out
    c, _, _, log2_beta, log2_1mb = kernel_scalars(k.inv_temperature, k.beta)
    block = _block(k.vocab_size)
    opts, xo = logit_options(k, transforms_only=True)
    with kernel_launch(student.device):
        shard_row_sums_kernel[(n,)](student, teacher, stats, out, student.stride(0), teacher.stride(0), k.vocab_size,
                                    c, log2_beta, log2_1mb, *xo, DIVERGENCE=DIVERGENCE_IDS[divergence], BLOCK=block,
                                    OPTS=opts, num_warps=warps_for(block))
    return out


def write_grad(student, teacher, labels, grad_scale, stats, sums, vocab_start, k: KernelSettings):
    check_operator_args(student, teacher, labels, grad_scale, stats, k, SUPPORTED_DTYPES)
    if resolve_divergence(k.divergence, k.beta) != "forward_kl":
        if sums is None:
            raise ValueError("fastkd: shard_write_grad needs row_sums for reverse_kl, jsd and tvd")
        _check_table("row_sums", sums, student, ROW_SUMS_WIDTH)
    if vocab_start < 0:
        raise ValueError(f"fastkd: vocab_start must be >= 0, got {vocab_start}")
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    dense._launch_forward(student, teacher, labels, grad_scale, stats, k, grad, sums, vocab_start)
    return grad
