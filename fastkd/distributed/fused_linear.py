"""The fused-linear KD loss with a vocabulary-sharded (column-parallel) LM head.

Under tensor parallelism the LM head ``[V, H]`` is split by rows (vocabulary) across the
ranks of a group, Megatron's column-parallel linear: every rank holds the same hidden
states ``[N, H]`` and its rows ``[V_r, H]`` of the student's and the teacher's head.
``vocab_parallel_fused_linear_kd_loss`` computes ``fused_linear_kd_loss`` over the whole
head without any rank holding more than its own columns of the logits, and never all of
them at once: it runs fastkd/fused_linear.py's chunk loop on the local slice, and for each
chunk of tokens

1. the slice's logits ``[chunk, V_r]`` of both sides (fp32 output, as the dense loss);
2. the vocab-parallel loss phases on them (fastkd/distributed/vocab_parallel.py): a MAX
   and a SUM all-reduce of a few floats per row (and a third, SUM, for JSD and TVD), then
   the slice's d loss / d logits;
3. ``grad_weight_r += dlogits.T @ hidden`` (local: the slice's rows of the head's
   gradient) and ``grad_hidden[chunk] = dlogits @ W_r``, a partial sum over the slice's
   columns.

After the loop, one all-reduce (SUM) of ``grad_hidden`` ``[N, H]`` over the group gives
every rank the full hidden-state gradient: the backward of the column-parallel linear's
"copy to the tensor-parallel region". So the caller passes the replicated hidden states
as they are, without a copy/all-reduce wrapper of its own (that would sum twice).

Collectives per call: the handshake's all_gather (without ``vocab_start=``; it also
checks the ranks agree), 2 per chunk (forward KL) or 3 (reverse KL, JSD, TVD), and one
all-reduce of ``N x H`` hidden-gradient entries when the hidden states require grad.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from .._checks import check_label_tensor, check_labels, check_num_items, check_same_tokens, reduction_scale
from .._dispatch import backend_for
from ..config import KDConfig, check_bool, make_config, takes_settings
from ..fused_linear import (FusedLinearKDFunction, Plan, _autocast_side, _check_chunk_size, _check_side,
                            _check_side_dtypes, auto_chunk_size, matmul_mode)
from .layout import Layout, check_vocab_start, handshake
from .vocab_parallel import ShardedRows


# ---------------------------------------------------------------------------------------
# Checks and the public function.

def _check_initialised() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_fused_linear_kd_loss needs torch.distributed initialised "
                           "(dist.init_process_group)")


def _logits_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _local_checks(hs, ws, bs, ht, wt, bt, labels, cfg: KDConfig, num_items, inplace_backward, chunk_size,
                  backend: str, vocab_start):
    """Everything one rank can check alone, before any collective: returns
    (the sides after autocast, the kernels, num_items)."""
    check_bool("inplace_backward", inplace_backward)
    _check_chunk_size(chunk_size)
    _check_side("student", hs, ws, bs)
    _check_side("teacher", ht, wt, bt)
    check_same_tokens("student_hidden", hs, "teacher_hidden", ht)
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(
            f"student_weight and teacher_weight must hold the same vocabulary rows on each rank, got "
            f"{ws.shape[0]} and {wt.shape[0]} rows (split both heads the same way)")
    device = hs.device
    hs, ws, bs = _autocast_side(device.type, hs, ws, bs)
    ht, wt, bt = _autocast_side(device.type, ht, wt, bt)
    _check_side_dtypes("student", hs, ws, bs)
    _check_side_dtypes("teacher", ht, wt, bt)
    lead = hs.shape[:-1]
    if labels is None:
        check_labels(None, lead, device, cfg)  # alpha != 1 needs labels
    else:
        check_label_tensor(labels, lead, device, "hidden states", "hidden")
    num_items = check_num_items(num_items, cfg.reduction)
    kernels = backend_for(backend, device, _logits_dtype(ws), _logits_dtype(wt), what="inputs", cfg=cfg)
    if kernels.shard is None:
        raise ValueError(f"backend {kernels.name!r} has no vocab-parallel phases")
    if vocab_start is not None:
        check_vocab_start(vocab_start, labels, cfg)
    return (hs, ws, bs, ht, wt, bt), kernels, num_items


def _stand_in_logits(hidden, weight):
    """A zero-memory tensor shaped and typed like this rank's logits slice, for the handshake
    (which compares rows, widths and dtypes across ranks)."""
    return torch.empty((), dtype=weight.dtype, device=hidden.device).expand(*hidden.shape[:-1], weight.shape[0])


@takes_settings(after=("num_items", "inplace_backward", "chunk_size", "backend"))
def vocab_parallel_fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    group=None,
    vocab_start: Optional[int] = None,
    num_items=None,
    inplace_backward: bool = False,
    chunk_size: Union[str, int] = "auto",
    backend: str = "auto",
    **settings,
) -> torch.Tensor:
    """``fused_linear_kd_loss`` with both LM heads split by vocabulary across ``group``.

    Every rank passes the same hidden states and labels, and its contiguous rows of each
    head (rank r's rows follow rank r-1's; the ranks' row counts may differ). The loss is
    the same on every rank and equals ``fused_linear_kd_loss`` on the concatenated heads;
    the gradient of ``student_hidden`` is the full one on every rank (all-reduced over the
    group, as a column-parallel linear's backward does), those of ``student_weight`` and
    ``student_bias`` are this rank's rows of the full ones. No rank holds more than one
    chunk of its own slice of the logits.

    Args:
        student_hidden: ``[..., Hs]`` the student's final hidden states, replicated over the
            group (pass them as they are: the loss does the column-parallel all-reduce of
            their gradient itself).
        student_weight: ``[V_r, Hs]`` this rank's rows of the student's LM head.
        teacher_hidden: ``[..., Ht]`` the teacher's, a constant (as in ``fused_linear_kd_loss``).
        teacher_weight: ``[V_r, Ht]`` the same rows of the teacher's head (used as a constant).
        labels: ``[...]`` global token ids, the same on every rank.
        student_bias, teacher_bias: ``[V_r]`` this rank's entries of the heads' biases.
        group: the tensor-parallel process group (None: the default group).
        vocab_start: the global index of this rank's first row. None: found with one
            all_gather of the slices' widths (the handshake), which also checks that the
            ranks agree on tokens, dtypes, labels, settings and whether ``student_hidden``
            requires grad, so bad input raises the same error on every rank (on a GPU it
            reads the result on the host: one sync). Given: no handshake, so NOTHING is
            compared across ranks. Ranks that disagree, or heads split with overlaps or
            gaps, give a wrong loss (a different one on each rank) without any error, or a
            collective that fails or waits until the group's timeout (so does backward
            when ``student_hidden`` requires grad on some ranks only). Each rank checks
            only its own arguments, and with the CE term a label that no slice holds (or
            two hold) makes its row's loss NaN.
        {settings}
            ``vocab_size`` counts globally: rows at or past it, on whichever rank, get zero
            gradient.
        num_items, inplace_backward, chunk_size, backend: as in ``fused_linear_kd_loss``;
            ``chunk_size="auto"`` sizes the chunks by this rank's ``V_r`` (bigger chunks,
            fewer collectives), and ``backend`` picks whose per-shard phases run.

    ``student_hidden`` must require grad on every rank of the group or on none (its
    gradient's all-reduce is a collective): the handshake raises otherwise; with
    ``vocab_start=`` the ranks that require it wait in backward until the group's timeout.
    """
    cfg = make_config("vocab_parallel_fused_linear_kd_loss", **settings)
    _check_initialised()
    args = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
    if vocab_start is not None:  # no handshake: a local error is raised here, on this rank
        sides, kernels, num_items = _local_checks(*args, labels, cfg, num_items, inplace_backward, chunk_size,
                                                  backend, vocab_start)
        layout = Layout.from_vocab_start(vocab_start, student_weight.shape[0], cfg)
    else:
        local_error, sides, stand_ins = None, args, (None, None)
        try:
            sides, kernels, num_items = _local_checks(*args, labels, cfg, num_items, inplace_backward,
                                                      chunk_size, backend, None)
            stand_ins = (_stand_in_logits(sides[0], sides[1]), _stand_in_logits(sides[3], sides[4]))
        except (TypeError, ValueError) as exc:
            local_error = exc
        wants_grad = local_error is None and torch.is_grad_enabled() and sides[0].requires_grad
        layout = handshake(*stand_ins, labels, cfg, num_items, local_error, group, wants_grad=wants_grad,
                           caller="vocab_parallel_fused_linear_kd_loss", grad_arg="student_hidden")
    hs, ws, bs, ht, wt, bt = sides
    cfg = cfg.with_vocab_size(layout.vocab_size)   # global: the reduction and the checks see the whole head

    device = hs.device
    flat_hs = hs.reshape(-1, hs.shape[-1])
    flat_ht = ht.detach().reshape(-1, ht.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    n, width = flat_hs.shape[0], ws.shape[0]
    if chunk_size == "auto":
        chunk_size = auto_chunk_size(n, width, _logits_dtype(ws), _logits_dtype(wt), device)
    rows = ShardedRows(kernels.shard, group, layout.vocab_start, layout.counted, layout.check_label_found)
    grad_enabled = torch.is_grad_enabled()
    plan = Plan(
        cfg=cfg, backend=kernels.name, chunk_size=chunk_size,
        student_matmul=matmul_mode(ws),
        want_hidden_grad=grad_enabled and hs.requires_grad,
        want_weight_grad=grad_enabled and ws.requires_grad,
        want_bias_grad=grad_enabled and bs is not None and bs.requires_grad,
        kernel=lambda s, t, lab, scale: rows(s, t, lab, scale, cfg),
        columns=width,
        reduce_hidden_grad=lambda grad: dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group),
    )
    grad_scale = reduction_scale(flat_labels, n, cfg, num_items, device, _logits_dtype(ws))
    out = FusedLinearKDFunction.apply(
        flat_hs, ws, bs, flat_labels, grad_scale, plan, flat_ht, wt.detach(), None if bt is None else bt.detach())
    return out if cfg.reduction != "none" else out.reshape(hs.shape[:-1])
