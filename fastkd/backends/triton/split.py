"""The vocabulary-split path of the dense forward: few rows at a large V.

One program per row leaves most SMs idle at N = 16..256 rows of V >= 128k columns. Here
each row's columns are cut into ``splits`` chunks of whole blocks (launch.vocab_splits),
one program per (row, split), and the phases that need the whole row meet between launches:

    split_row_stats_kernel   per split: the partial row_stats (raw maxes and sums anchored
                             at them, as ``row_stats_sweep`` gives them), and split 0 stores
                             the label's logit (read before any in-place write of its row)
    split_row_sums_kernel    tvd, reverse_kl, jsd: per split, the four partial row sums
                             (``_row_sums_sweep``), fp64 as the one-program sweep keeps them
    split_write_grad_kernel  per split: write_grad over its columns (the last split also
                             zeroes the student past V) and its part of the row's loss;
                             split 0 adds the T = 1 terms (CE, z-loss) and the row sums' part of D

Each program combines the partials of its row itself (a vector of ``splits`` entries:
max, then sums rescaled to the common anchor, the rule that combines row_stats shards),
so no launch runs only to combine. The split passes sweep blocks [begin, end) of the row's
own frame (rows.py: peeled rows), so peeled rows keep one lead and labels their columns.
The loss is the sum of [N, splits + 1] parts (one small torch sum: deterministic, no
atomics): each split's part of D from its write_grad sweep, and the head part (the row
sums' part of D, the CE and z-loss terms) that split 0 stores; label smoothing's sum of s'
is each split's, in its own part. Ignored rows and labels outside [0, V) are skipped
by the first two passes; the write pass gives them a zero or NaN gradient and loss, as the
one-program kernel does. Traffic is that kernel's: 2 reads of the row for forward_kl, 3
for the others, and one write of the gradient.
"""
import torch
import triton
import triton.language as tl

from .dense import (DIVERGENCE_IDS, _FORWARD_KL, _TVD, _divergence_value, _grad_constants, _row_sums_sweep,
                    _write_grad_sweep_stats)
from .launch import kernel_launch
from .rows import (CE_RAW, CE_SHARED, LN2, NO_COLUMN, OPT_NO_CE, OPT_SMOOTH, STATS_WIDTH, aligned_base, anchor, anchors,
                   hard_label_grads, hard_label_loss, row_base, row_lead, row_stats_sweep_top1, store_blank_stats,
                   store_stats, student_x, zero32, zero64)

# Per (row, split) partial row_stats: raw max and anchored sum-exp of s/T, of t/T, the raw
# sum-exp of s (CE at T != 1), and (split 0) the label's logit.
PART_WIDTH = 6
_PART_WIDTH = tl.constexpr(PART_WIDTH)
_CE_SHARED = tl.constexpr(CE_SHARED)
_CE_RAW = tl.constexpr(CE_RAW)
_SMOOTH = tl.constexpr(OPT_SMOOTH)
_NO_CE = tl.constexpr(OPT_NO_CE)
_STATS_WIDTH = tl.constexpr(STATS_WIDTH)


@triton.jit
def _label_of(LABELS, row, V, ignore_index, HAS_LABELS: tl.constexpr):
    """(label, live, fill): the row's label, whether the row takes part in the loss, and
    the value of its gradient and loss when not (0 ignored, NaN outside [0, V))."""
    if HAS_LABELS:
        label = tl.load(LABELS + row)
        ignored = label == ignore_index
        live = ~(ignored | (label < 0) | (label >= V))
        fill = tl.where(ignored, 0.0, float("nan"))
    else:
        label = -1
        live = True
        fill = 0.0
    return label, live, fill


@triton.jit
def _split_program(LABELS, V, ignore_index, HAS_LABELS: tl.constexpr):
    """(row, split, splits, label, live, fill) of this program (``_label_of``)."""
    row = tl.program_id(0).to(tl.int64)
    label, live, fill = _label_of(LABELS, row, V, ignore_index, HAS_LABELS)
    return row, tl.program_id(1), tl.num_programs(1), label, live, fill


@triton.jit
def _split_blocks(split, n_splits, chunk, row_end):
    """[begin, end): the positions of a split in its row's frame (rows.py: peeled rows,
    position = column + lead), whole blocks: the chunk is a multiple of the block and so of
    the peel period. The last split runs to ``row_end`` (V + lead for the statistics and
    sums; g_width + lead for write_grad: the student's columns past V get zeros)."""
    # Hinted: a peeled sweep's loads are 16-byte vectors only where the compiler proves
    # its positions start on a granule (the JIT also specialises chunk % 16 == 0).
    begin = tl.multiple_of(split * chunk, 16)
    return begin, tl.where(split == n_splits - 1, row_end, begin + chunk)


@triton.jit
def _combined_stats(part, n_splits, inv_temperature, temperature, CE: tl.constexpr, SPLITS: tl.constexpr):
    """(lse2_s, lse2_t, lse2_r) of a row from its ``n_splits`` partial row_stats: the
    maxes' max, anchored as ``anchors`` anchors a sweep's, and each partial sum rescaled
    from its own anchor to it (a split whose max is -inf adds 0)."""
    k = tl.arange(0, SPLITS)
    live = k < n_splits
    row = part + k * _PART_WIDTH
    m_s = tl.load(row + 0, mask=live, other=float("-inf"))
    z_s = tl.load(row + 1, mask=live, other=0.0)
    m_t = tl.load(row + 2, mask=live, other=float("-inf"))
    z_t = tl.load(row + 3, mask=live, other=0.0)
    z_r = tl.load(row + 4, mask=live, other=0.0)
    a_s, a_t, a_r = anchors(m_s, m_t, inv_temperature, temperature)
    A_s, A_t, A_r = anchors(tl.max(m_s, axis=0), tl.max(m_t, axis=0), inv_temperature, temperature)
    Z_s = tl.sum(z_s * tl.exp2(a_s - anchor(A_s)), axis=0)
    Z_t = tl.sum(z_t * tl.exp2(a_t - anchor(A_t)), axis=0)
    lse2_s = anchor(A_s) + tl.log2(Z_s)
    lse2_t = anchor(A_t) + tl.log2(Z_t)
    lse2_r = 0.0
    if CE == _CE_SHARED:  # T == 1: the CE softmax is the student's own
        lse2_r = lse2_s
    elif CE == _CE_RAW:
        lse2_r = anchor(A_r) + tl.log2(tl.sum(z_r * tl.exp2(a_r - anchor(A_r)), axis=0))
    return lse2_s, lse2_t, lse2_r


@triton.jit
def split_row_stats_kernel(S, T, LABELS, PART, s_stride, t_stride, V, chunk, s_lead,
                           c, inv_temperature, temperature, ignore_index,
                           s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss,
                           HAS_LABELS: tl.constexpr, CE: tl.constexpr, BLOCK: tl.constexpr, PEEL: tl.constexpr,
                           OPTS: tl.constexpr, TOP1_PART, RETURN_STATS: tl.constexpr):
    xo = (s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss)
    row, split, n_splits, label, live, _ = _split_program(LABELS, V, ignore_index, HAS_LABELS)
    if live:
        lead = row_lead(s_lead, row, s_stride, PEEL)
        begin, end = _split_blocks(split, n_splits, chunk, V + lead)
        m_s, z_s, m_t, z_t, z_r, col_s, col_t = row_stats_sweep_top1(
            aligned_base(row_base(S, row, s_stride), lead, PEEL), aligned_base(row_base(T, row, t_stride), lead, PEEL),
            lead, begin, end, V, c, inv_temperature, temperature, xo, BLOCK, CE == _CE_RAW, PEEL, OPTS, RETURN_STATS)
        if RETURN_STATS:  # the split's argmax columns (the split's maxes are stored below)
            top1 = TOP1_PART + (row * n_splits + split) * 2
            tl.store(top1 + 0, col_s)
            tl.store(top1 + 1, col_t)
        out = PART + (row * n_splits + split) * _PART_WIDTH
        tl.store(out + 0, m_s)
        tl.store(out + 1, z_s)
        tl.store(out + 2, m_t)
        tl.store(out + 3, z_t)
        tl.store(out + 4, z_r)
        if CE != 0 and (_NO_CE & OPTS) == 0:
            if split == 0:  # before the write pass can overwrite it (in place)
                tl.store(out + 5, student_x(tl.load(row_base(S, row, s_stride) + label).to(tl.float32), True, xo,
                                            OPTS))


@triton.jit
def _combined_top1(part, top1, n_splits, SPLITS: tl.constexpr):
    """Whether the row's argmaxes agree, from its splits' maxes and argmax columns: on each
    side the lowest column among the splits whose max is the row's (splits hold increasing
    columns, so that is the first such split's first column: torch.argmax's rule). A row of
    NaN maxes matches no split and does not agree."""
    k = tl.arange(0, SPLITS)
    live = k < n_splits
    m_s = tl.load(part + k * _PART_WIDTH + 0, mask=live, other=float("-inf"))
    m_t = tl.load(part + k * _PART_WIDTH + 2, mask=live, other=float("-inf"))
    c_s = tl.load(top1 + k * 2 + 0, mask=live, other=0)
    c_t = tl.load(top1 + k * 2 + 1, mask=live, other=0)
    col_s = tl.min(tl.where(live & (m_s == tl.max(m_s, axis=0)), c_s, NO_COLUMN), axis=0)
    col_t = tl.min(tl.where(live & (m_t == tl.max(m_t, axis=0)), c_t, NO_COLUMN), axis=0)
    return (col_s == col_t) & (col_s != NO_COLUMN)


@triton.jit
def split_row_sums_kernel(S, T, LABELS, PART, SUMS, s_stride, t_stride, V, chunk, s_lead,
                          c, inv_temperature, temperature, log2_beta, log2_1mb, ignore_index,
                          s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss,
                          DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, CE: tl.constexpr,
                          BLOCK: tl.constexpr, PEEL: tl.constexpr, SPLITS: tl.constexpr, OPTS: tl.constexpr):
    xo = (s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss)
    row, split, n_splits, label, live, _ = _split_program(LABELS, V, ignore_index, HAS_LABELS)
    if live:
        lse2_s, lse2_t, _ = _combined_stats(PART + row * n_splits * _PART_WIDTH, n_splits, inv_temperature,
                                            temperature, 0, SPLITS)
        lead = row_lead(s_lead, row, s_stride, PEEL)
        begin, end = _split_blocks(split, n_splits, chunk, V + lead)
        if DIVERGENCE == _TVD:
            zero = zero32()
        else:
            zero = zero64()
        x0, x1, x2, x3 = _row_sums_sweep(aligned_base(row_base(S, row, s_stride), lead, PEEL),
                                         aligned_base(row_base(T, row, t_stride), lead, PEEL), lead, begin, end, V,
                                         c, lse2_s, lse2_t, log2_beta, log2_1mb, zero, zero, zero, zero, xo,
                                         DIVERGENCE, BLOCK, PEEL, OPTS)
        out = SUMS + (row * n_splits + split) * 4
        tl.store(out + 0, x0.to(tl.float64))
        tl.store(out + 1, x1.to(tl.float64))
        tl.store(out + 2, x2.to(tl.float64))
        tl.store(out + 3, x3.to(tl.float64))


@triton.jit
def _combined_sums(sums, n_splits, DIVERGENCE: tl.constexpr, SPLITS: tl.constexpr):
    """The four row sums from the splits' partials: fp64 (tvd: fp32, as its sweep keeps them)."""
    k = tl.arange(0, SPLITS)
    live = k < n_splits
    x0 = tl.sum(tl.load(sums + k * 4 + 0, mask=live, other=0.0), axis=0)
    x1 = tl.sum(tl.load(sums + k * 4 + 1, mask=live, other=0.0), axis=0)
    x2 = tl.sum(tl.load(sums + k * 4 + 2, mask=live, other=0.0), axis=0)
    x3 = tl.sum(tl.load(sums + k * 4 + 3, mask=live, other=0.0), axis=0)
    if DIVERGENCE == _TVD:
        return x0.to(tl.float32), x1.to(tl.float32), x2.to(tl.float32), x3.to(tl.float32)
    else:
        return x0, x1, x2, x3


@triton.jit
def split_write_grad_kernel(S, T, G, LABELS, GRAD_SCALE, PART, SUMS, LOSS_PART,
                            s_stride, t_stride, g_stride, V, g_width, chunk, s_lead,
                            c, inv_temperature, temperature, beta, log2_beta, log2_1mb, div_weight, ce_weight,
                            ignore_index, s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss,
                            DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, CE: tl.constexpr,
                            BLOCK: tl.constexpr, PEEL: tl.constexpr, SPLITS: tl.constexpr, OPTS: tl.constexpr,
                            TOP1_PART, STATS_PART, RETURN_STATS: tl.constexpr):
    """RETURN_STATS: the per-token diagnostics as [N, splits + 1, STATS_WIDTH] parts, summed
    by the launcher as the loss's: each split's entropy sums and part of D, and in the head
    column (split 0) the agreement and the row sums' part of D; NaN in split 0's part of an
    ignored row (and the agreement 0)."""
    CE_TERM: tl.constexpr = CE != 0 and (_NO_CE & OPTS) == 0  # else the T = 1 statistics are the z-loss's
    xo = (s_mul, s_cap, s_scale, s_inv_cap, t_mul, t_cap, ce_keep, smooth, z_loss)
    row, split, n_splits, label, live, fill = _split_program(LABELS, V, ignore_index, HAS_LABELS)
    lead = row_lead(s_lead, row, s_stride, PEEL)
    g_base = aligned_base(row_base(G, row, g_stride), lead, PEEL)
    begin, end = _split_blocks(split, n_splits, chunk, g_width + lead)
    # [N, splits + 1] loss parts: each split's sweep part, and split 0's head part last.
    out = LOSS_PART + row * (n_splits + 1) + split
    if RETURN_STATS:
        stats_out = STATS_PART + (row * (n_splits + 1) + split) * _STATS_WIDTH
        stats_head = STATS_PART + (row * (n_splits + 1) + n_splits) * _STATS_WIDTH
    if live:
        scale = tl.load(GRAD_SCALE).to(tl.float32)
        gdiv = scale * div_weight * inv_temperature
        gce = scale * ce_weight
        part = PART + row * n_splits * _PART_WIDTH
        lse2_s, lse2_t, lse2_r = _combined_stats(part, n_splits, inv_temperature, temperature, CE, SPLITS)
        gh = hard_label_grads(gce, scale, lse2_r, xo, OPTS)
        if DIVERGENCE == _FORWARD_KL:
            k0, k1, k2, k3, sums_value = 0.0, 0.0, 0.0, 0.0, zero32()
        else:
            x0, x1, x2, x3 = _combined_sums(SUMS + row * n_splits * 4, n_splits, DIVERGENCE, SPLITS)
            k0, k1, k2, k3, sums_value = _grad_constants(x0, x1, x2, x3, beta, DIVERGENCE)
        # The head part of the loss, once per row (split 0), stored before the sweep in a
        # column of its own (held across the sweep, it took the peeled 16-bit JSD build to
        # a 4-byte spill under the CUDA toolkit's ptxas): the row sums' part of D and the T = 1
        # terms (D is linear in the row sums' and the sweep's values: _divergence_value; label
        # smoothing's sum of s' is each split's, in its own part).
        if split == 0:
            head = div_weight * _divergence_value(sums_value, 0.0, beta, DIVERGENCE)
            if CE != 0:
                s_label = 0.0
                if CE_TERM:
                    s_label = tl.load(part + 5)
                head += hard_label_loss(lse2_r, s_label, 0.0, ce_weight, xo, CE_TERM, OPTS)
            tl.store(out + n_splits, head)
            if RETURN_STATS:
                agree = _combined_top1(part, TOP1_PART + row * n_splits * 2, n_splits, SPLITS)
                store_stats(stats_head, 0.0, 0.0, agree, _divergence_value(sums_value, 0.0, beta, DIVERGENCE), 0.0)
        sweep_value, sum_s, e_p, e_q = _write_grad_sweep_stats(
            aligned_base(row_base(S, row, s_stride), lead, PEEL), aligned_base(row_base(T, row, t_stride), lead, PEEL),
            g_base, lead, begin, end, V, g_width, label, c, lse2_s, lse2_t, log2_beta, log2_1mb, k0, k1, k2, k3, gdiv,
            lse2_r, gh, xo, DIVERGENCE, CE, BLOCK, PEEL, OPTS, RETURN_STATS)
        d_part = _divergence_value(0.0, sweep_value, beta, DIVERGENCE)
        value = div_weight * d_part
        if CE_TERM and (_SMOOTH & OPTS) != 0:
            value -= ce_weight * (smooth * sum_s)
        tl.store(out, value)
        if RETURN_STATS:
            store_stats(stats_out, e_p * -LN2, e_q * -LN2, 0.0, d_part, 0.0)
    else:
        tl.store(out, tl.where(split == 0, fill, 0.0))
        if split == 0:
            tl.store(out + n_splits, 0.0)
        if RETURN_STATS:
            if split == 0:
                store_blank_stats(stats_out)
                store_stats(stats_head, 0.0, 0.0, 0.0, 0.0, 0.0)
            else:
                store_stats(stats_out, 0.0, 0.0, 0.0, 0.0, 0.0)
        _fill_blocks(g_base, lead, begin, end, g_width, fill, BLOCK)


@triton.jit
def _fill_blocks(g_base, lead, begin, end, g_width, value, BLOCK: tl.constexpr):
    """Columns of positions [begin, end) of a gradient row's frame set to ``value``."""
    fill = (tl.zeros([BLOCK], dtype=tl.float32) + value).to(g_base.dtype.element_ty)
    for start in range(begin, end, BLOCK):
        cols = start + tl.arange(0, BLOCK) - lead
        tl.store(g_base + lead + cols, fill, mask=(cols >= 0) & (cols < g_width))


def launch(student, teacher, labels, grad_scale, grad, k, divergence, cfg, split, peel, lead, scalars, ce_mode,
           opts, xo, stats_out=None):
    """The three passes over a (rows, splits) grid; returns the [N] fp32 loss. ``split``:
    launch.VocabSplit; ``scalars``: dense.kernel_scalars; ``opts``, ``xo``: the logit options
    (launch.logit_options); the rest as dense's launcher chose them for the one-program kernel.
    ``stats_out``: [N, STATS_WIDTH] fp32 that receives the per-token diagnostics (the sum of
    the write pass's parts), or None."""
    n = student.shape[0]
    splits = split.splits
    c, inv_t, temp, log2_beta, log2_1mb = scalars
    device = student.device
    part = torch.empty((n, splits, PART_WIDTH), dtype=torch.float32, device=device)
    sums = torch.empty((n, splits, 4), dtype=torch.float64, device=device)
    loss_part = torch.empty((n, splits + 1), dtype=torch.float32, device=device)
    with_stats = stats_out is not None
    # The stats' parts: each (row, split)'s argmax columns, and the write pass's table parts.
    top1 = torch.empty((n, splits, 2), dtype=torch.int32, device=device) if with_stats else None
    stats_part = torch.empty((n, splits + 1, STATS_WIDTH), dtype=torch.float32, device=device) if with_stats else None
    labels_ptr = labels if labels is not None else loss_part  # unused pointer when there are no labels
    common = dict(HAS_LABELS=labels is not None, CE=ce_mode, BLOCK=cfg.block, PEEL=peel, OPTS=opts,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    width = triton.next_power_of_2(splits)
    grid = (n, splits)
    with kernel_launch(device):
        split_row_stats_kernel[grid](student, teacher, labels_ptr, part, student.stride(0), teacher.stride(0),
                                     k.vocab_size, split.chunk, lead, c, inv_t, temp, int(k.ignore_index), *xo,
                                     TOP1_PART=top1, RETURN_STATS=with_stats, **common)
        if divergence != "forward_kl":
            split_row_sums_kernel[grid](student, teacher, labels_ptr, part, sums, student.stride(0),
                                        teacher.stride(0), k.vocab_size, split.chunk, lead, c, inv_t, temp,
                                        log2_beta, log2_1mb, int(k.ignore_index), *xo,
                                        DIVERGENCE=DIVERGENCE_IDS[divergence], SPLITS=width, **common)
        split_write_grad_kernel[grid](student, teacher, grad, labels_ptr, grad_scale, part, sums, loss_part,
                                      student.stride(0), teacher.stride(0), grad.stride(0), k.vocab_size,
                                      grad.shape[1], split.chunk, lead, c, inv_t, temp, float(k.beta), log2_beta,
                                      log2_1mb, float(k.div_weight), float(k.ce_weight), int(k.ignore_index), *xo,
                                      DIVERGENCE=DIVERGENCE_IDS[divergence], SPLITS=width, TOP1_PART=top1,
                                      STATS_PART=stats_part, RETURN_STATS=with_stats, **common)
    if with_stats:
        torch.sum(stats_part, dim=1, out=stats_out)
    return loss_part.sum(dim=1)
