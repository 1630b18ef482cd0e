"""``vocab_parallel_kd_loss``: the fused KD loss on vocabulary-sharded logits (tensor parallelism).

Each rank holds a contiguous slice ``[..., V_local]`` of both the student's and the
teacher's logits. The kernels run the three phases of every fastkd backend on the local
slice only (fastkd/backends/__init__.py: the shard operators), and the ranks exchange a
few numbers per row between the phases, never logits:

    handshake   (only without vocab_start=; layout.py) one all_gather of HEADER_WIDTH int64
                per RANK: the slices' widths (their offsets), the row count, dtypes,
                whether the student requires grad, settings and a labels digest, so that
                bad or inconsistent input raises the same error on every rank instead of
                hanging a collective
    row_stats   local pass: maxima and sum-exps against the LOCAL maxima, and the value
                term of forward/reverse KL
    round 1     all_reduce(MAX) of (max_s, max_t): 2 floats per row
                each rank moves its sums to the global maxima: sum * exp(m_local - M)
    round 2     all_reduce(SUM) of (sumexp_s, sumexp_t[, value term][, CE or z-loss: sumexp_raw]
                [, label smoothing: sum of s'][, CE: label logit[, label found]]): 2 to 7 floats
                per row
                -> every rank has the row's log-normalisers, and forward/reverse KL and CE
                   values: KL(p||q) = A / S_t - delta, KL(q||p) = B / S_s + delta, with
                   delta = lse_t - lse_s, A = sum e^(b - M_t) (b - a), B = sum e^(a - M_s) (a - b)
    row_sums    (reverse_kl, jsd, tvd) local pass with the global statistics: the centring sums
    round 3     (reverse_kl, jsd, tvd) all_reduce(SUM) of the row sums: 5 floats per row
    write_grad  local pass: the slice's gradient from the global statistics and sums

A "float" is 4 bytes (8 for float64 logits). So forward KL needs two collectives and two
passes over the slice, reverse KL, JSD and TVD three and three; the loss is the same on every
rank, and each rank's gradient is its slice of the full one.

Reverse KL takes the third round too, though round 2 already gives its value: its
gradient's centring sum must be split around a peaked entry (the sums over the entries
other than one with q > 1/2, as in the single-process kernels), or a row whose student
puts nearly all its mass on one token loses that token's gradient in fp32 (at
q_max = 1 - 1e-7 it was wrong by 100% when the sum came from round 2).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from .._autograd import fused_kd_loss
from .._checks import check_label_tensor, check_labels, check_logits, check_num_items, check_same_tokens
from .._dispatch import backend_for
from ..backends import ROW_SUMS_WIDTH, SHARD_STATS_WIDTH, KernelBackend, loss_dtype
from ..config import KDConfig, make_config, takes_settings
from ..reference import transform_logits
from .layout import Layout, check_vocab_start, handshake


# ---------------------------------------------------------------------------------------
# Checks: what one rank can check alone (the handshake, layout.py, checks across ranks).

def _local_checks(student, teacher, labels, cfg: KDConfig, num_items, backend: str, vocab_start):
    """The checks of one rank's arguments; returns (kernels, num_items)."""
    check_logits("student_shard", student)
    check_logits("teacher_shard", teacher)
    check_same_tokens("student_shard", student, "teacher_shard", teacher)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"student_shard and teacher_shard must hold the same vocabulary columns, got {student.shape[-1]} "
            f"and {teacher.shape[-1]} columns")
    if labels is None:
        check_labels(None, student.shape[:-1], student.device, cfg)  # alpha != 1 needs labels
    else:
        check_label_tensor(labels, student.shape[:-1], student.device, "logits", "vocab")
    num_items = check_num_items(num_items, cfg.reduction)
    kernels = backend_for(backend, student.device, student.dtype, teacher.dtype, cfg=cfg)
    if kernels.shard is None:
        raise ValueError(f"backend {kernels.name!r} has no vocab-parallel phases")
    if vocab_start is not None:
        check_vocab_start(vocab_start, labels, cfg)
    return kernels, num_items


# ---------------------------------------------------------------------------------------
# The loss: the phases and the rounds between them.

def _from_local_max(m_local, m_global, scale: float = 1.0):
    """exp(scale (m_local - m_global)): moves a sum-exp from the local max to the global one
    (0 for a slice whose entries are all -inf)."""
    factor = torch.exp((m_local - m_global) * scale)
    return torch.where(torch.isneginf(m_local), torch.zeros_like(factor), factor)


class ShardedRows:
    """The forward of one call, as a KernelBackend ``forward``: 2-D logits of this rank's
    slice in, the global per-row loss and this slice's gradient out (every rank calls it
    with the same rows: it runs the rounds' collectives)."""

    def __init__(self, phases, group, vocab_start: int, counted: int, check_label_found: bool):
        self.phases = phases
        self.group = group
        self.vocab_start = vocab_start
        self.counted = counted  # how many of this slice's columns lie below vocab_size
        self.check_label_found = check_label_found

    def __call__(self, student, teacher, labels, grad_scale, cfg: KDConfig):
        n = student.shape[0]
        dtype = loss_dtype(student, teacher)
        # The shard's columns, with label smoothing's epsilon spread over the global classes.
        local_cfg = cfg.with_vocab_size(max(self.counted, 1), classes=cfg.vocab_size)
        divergence = cfg.divergence
        with_ce = labels is not None and cfg.ce_weight != 0.0
        with_raw = with_ce or cfg.z_loss != 0.0
        with_smoothing = with_ce and cfg.label_smoothing != 0.0
        if self.counted > 0:
            part = self.phases.row_stats(student, teacher, local_cfg)
        else:  # a slice wholly past vocab_size: nothing of it counts
            part = torch.zeros((n, SHARD_STATS_WIDTH), dtype=dtype, device=student.device)
            part[:, 0] = part[:, 2] = -math.inf

        # Round 1: the global maxima.
        maxima = part[:, [0, 2]].contiguous()
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=self.group)
        max_s, max_t = maxima[:, 0], maxima[:, 1]
        f_s = _from_local_max(part[:, 0], max_s)
        f_t = _from_local_max(part[:, 2], max_t)

        # Round 2: the sums, moved to the global maxima, in named columns.
        columns = {"sum_s": part[:, 1] * f_s, "sum_t": part[:, 3] * f_t}
        if divergence in ("forward_kl", "reverse_kl"):
            columns["value"] = part[:, 5] * (f_t if divergence == "forward_kl" else f_s)
        if with_raw:
            columns["sum_raw"] = part[:, 4] * _from_local_max(part[:, 0], max_s, cfg.temperature)
        if with_smoothing:
            columns["sum_logits"] = part[:, 6]
        if with_ce:
            local = labels - self.vocab_start
            here = (local >= 0) & (local < self.counted) & (labels != cfg.ignore_index)
            at = torch.where(here, local, torch.zeros_like(local))[:, None]
            label_logit = transform_logits(student.gather(1, at)[:, 0].to(dtype), cfg.logit_scale, cfg.softcap)
            columns["s_label"] = torch.where(here, label_logit, torch.zeros_like(label_logit))
            if self.check_label_found:
                columns["found"] = here.to(dtype)
        packed = torch.stack(list(columns.values()), dim=1)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        g = dict(zip(columns, packed.unbind(1)))
        sum_s, sum_t = g["sum_s"], g["sum_t"]
        zero = torch.zeros_like(sum_s)
        stats = torch.stack([max_s, sum_s, max_t, sum_t, g.get("sum_raw", zero)], dim=1)
        if "found" in g:
            # A valid label that no slice holds (or two hold): never silently a number.
            lost = (labels != cfg.ignore_index) & (g["found"] != 1)
            stats = torch.where(lost[:, None], torch.full_like(stats, math.nan), stats)
        delta = (max_t - max_s) + (sum_t.log() - sum_s.log())

        # The divergence's value, and the row sums its gradient needs.
        row_sums = None
        if divergence == "forward_kl":
            value = g["value"] / sum_t - delta
        else:  # Round 3: the centring sums.
            if self.counted > 0:
                row_sums = self.phases.row_sums(student, teacher, stats, local_cfg)
            else:
                row_sums = torch.zeros((n, ROW_SUMS_WIDTH), dtype=dtype, device=student.device)
            dist.all_reduce(row_sums, op=dist.ReduceOp.SUM, group=self.group)
            if divergence == "reverse_kl":
                # The value from round 2; the gradient's centring sums from this round,
                # split around a peaked entry as the single-process kernels split them.
                value = g["value"] / sum_s + delta
            elif divergence == "tvd":
                value = row_sums[:, 0]
            else:
                beta = cfg.beta
                qh = (row_sums[:, 1] + row_sums[:, 3]) / (row_sums[:, 0] + row_sums[:, 2])
                value = beta * row_sums[:, 4] + (1.0 - beta) * qh
        loss = cfg.div_weight * value
        if with_raw:
            lse_raw = max_s * cfg.temperature + stats[:, 4].log()
        if with_ce:
            ce = lse_raw - (1.0 - cfg.label_smoothing) * g["s_label"]
            if with_smoothing:
                ce = ce - cfg.smooth_per_class * g["sum_logits"]
            loss = loss + cfg.ce_weight * ce
        if cfg.z_loss != 0.0:
            loss = loss + cfg.z_loss * lse_raw.square()
        if labels is not None:
            loss = torch.where(labels == cfg.ignore_index, torch.zeros_like(loss), loss)

        if self.counted > 0:
            grad = self.phases.write_grad(student, teacher, labels, grad_scale, stats, row_sums, self.vocab_start,
                                          local_cfg)
        else:
            grad = torch.zeros_like(student)
        return loss, grad


def _no_inplace(*args):
    raise NotImplementedError("vocab_parallel_kd_loss has no in-place backward")


@takes_settings(after=("num_items", "backend"))
def vocab_parallel_kd_loss(
    student_shard: torch.Tensor,
    teacher_shard: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    num_items=None,
    backend: str = "auto",
    **settings,
) -> torch.Tensor:
    """``kd_loss`` over logits split by vocabulary across the ranks of ``group``.

    Every rank passes its contiguous slice of the vocabulary, ``[..., V_local]`` of both
    the student's and the teacher's logits (slices may differ in width; rank r's slice
    follows rank r-1's). The loss is the same on every rank and equals ``kd_loss`` on the
    concatenated logits; each rank's gradient is its slice of that loss's gradient. The
    ranks exchange a few numbers per token, never logits (module docstring: the rounds).

    Args:
        student_shard: ``[..., V_local]`` this rank's columns of the student's logits.
        teacher_shard: ``[..., V_local]`` the same columns of the teacher's (a constant).
        labels: ``[...]`` global token ids (the same on every rank), for the CE term and
            ``ignore_index``.
        group: the tensor-parallel process group (None: the default group).
        vocab_start: the global index of this rank's first column. None: found from one
            all_gather of the slices' widths (the handshake), which also checks that the
            ranks agree on rows, dtypes, labels, settings and whether ``student_shard``
            requires grad, so that bad input raises the same error on every rank (on a GPU
            it reads the result on the host: one sync). Given: no handshake, so NOTHING is
            compared across ranks. Ranks that disagree, or slices that overlap or leave a
            gap, give a wrong loss (a different one on each rank) without any error, or a
            collective that fails (gloo aborts the process on a size mismatch) or waits
            until the group's timeout. Each rank checks only its own arguments, and with
            the CE term a label that no slice holds (or two hold) makes its row's loss NaN.
        {settings}
            ``vocab_size`` counts globally: columns at or past it, on whichever rank, get
            zero gradient. With ``vocab_start=`` and no ``vocab_size``, every column counts.
        num_items: the denominator of ``reduction="mean"``, as in ``kd_loss``.
        backend: ``auto``, ``cpu``, ``cuda``, ``triton`` or ``torch``: whose per-shard phases run.
    """
    cfg = make_config("vocab_parallel_kd_loss", **settings)
    kernels, num_items, rows, cfg = shard_rows(student_shard, teacher_shard, labels, cfg, num_items, backend, group,
                                               vocab_start)
    sharded = KernelBackend(f"{kernels.name}+vocab_parallel", rows, _no_inplace, kernels.scale_grad_,
                            kernels.supports, kernels.dtypes)
    return fused_kd_loss(student_shard, teacher_shard, labels, cfg, num_items, sharded, False)


def shard_rows(student_shard, teacher_shard, labels, cfg: KDConfig, num_items, backend: str, group, vocab_start):
    """The checks of one call (and the handshake without vocab_start) and where this rank's
    slice lies: (kernels, num_items, ShardedRows, cfg with the global vocab_size)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_kd_loss needs torch.distributed initialised (dist.init_process_group)")
    if vocab_start is not None:  # nothing to tell the other ranks: a local error is raised here
        kernels, num_items = _local_checks(student_shard, teacher_shard, labels, cfg, num_items, backend,
                                           vocab_start)
        layout = Layout.from_vocab_start(vocab_start, student_shard.shape[-1], cfg)
    else:
        local_error = None
        try:
            kernels, num_items = _local_checks(student_shard, teacher_shard, labels, cfg, num_items, backend, None)
        except (TypeError, ValueError) as exc:
            local_error = exc
        wants_grad = local_error is None and torch.is_grad_enabled() and student_shard.requires_grad
        layout = handshake(student_shard, teacher_shard, labels, cfg, num_items, local_error, group,
                           wants_grad=wants_grad, caller="vocab_parallel_kd_loss", grad_arg="student_shard")
    rows = ShardedRows(kernels.shard, group, layout.vocab_start, layout.counted, layout.check_label_found)
    # The global vocab_size, for the reduction's and the checks' view of the config.
    return kernels, num_items, rows, cfg.with_vocab_size(layout.vocab_size)
