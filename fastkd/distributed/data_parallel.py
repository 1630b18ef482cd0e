"""Data parallelism: the step's global count of valid tokens, for ``num_items``.

With ``reduction="mean"`` a loss divides by the valid tokens of the tensors it is given.
Under data parallelism (DDP, FSDP) and gradient accumulation one optimizer step sees
``R`` ranks x ``M`` micro-batches, and the gradient wanted is that of the step's mean,

    L = (1 / C) * sum over ranks r, micro-batches m, valid tokens i of l_{r,m,i},
    C = sum over r, m of c_{r,m}        (c_{r,m}: valid tokens of micro-batch m on rank r).

Per-micro-batch means get it wrong. Rank r's micro-batch m then contributes
``(1 / c_{r,m}) * sum_i l_{r,m,i}``; averaged over the M micro-batches and the R ranks
(DDP averages gradients), a token weighs ``1 / (R * M * c_{r,m})`` instead of ``1 / C``.
The two agree only when every ``c_{r,m}`` equals ``C / (R M)``; with padding, packing or
prompt masking they do not, and a token of a short micro-batch counts for more. Example:
two ranks, one micro-batch each, 100 and 10 valid tokens: per-micro-batch means give each
token of the short one weight 1/20 and each of the long one 1/200, a 10x imbalance; the
step's mean gives every token 1/110.

The fix, for every micro-batch of the step on every rank:

    loss = kd_loss(..., num_items=global_num_items(labels_of_the_step)) * world_size

``global_num_items`` is C (one all-reduce over the data-parallel group, counted before the
first forward); each call then contributes ``(1 / C) * sum_i l_{r,m,i}``, the M backward
passes add up, and DDP/FSDP's *average* over the R ranks divides by R, which the factor
``world_size`` undoes: the gradient is exactly dL/dθ. (Equivalently, pass
``num_items = C / world_size``.) DDP and FSDP (``FullyShardedDataParallel`` and
``fully_shard``) average by default; a setup that sums gradients instead drops the factor.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..config import check_int

LabelsArg = Union[torch.Tensor, Sequence[torch.Tensor]]


def _label_list(labels: LabelsArg) -> list:
    """The labels as a non-empty list of integer tensors on one device (checked locally)."""
    if isinstance(labels, torch.Tensor):
        parts = [labels]
    elif isinstance(labels, (list, tuple)):
        parts = list(labels)
        if not parts:
            raise ValueError("labels must be a tensor or a non-empty list of tensors (the step's "
                             "micro-batches), got an empty sequence")
    else:
        raise TypeError(f"labels must be a tensor or a list/tuple of tensors (one per micro-batch), "
                        f"got {type(labels).__name__}")
    for i, part in enumerate(parts):
        name = "labels" if isinstance(labels, torch.Tensor) else f"labels[{i}]"
        if not isinstance(part, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(part).__name__}")
        if part.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an int64 (or int32) tensor, got {part.dtype}")
        if part.device != parts[0].device:
            raise ValueError(f"{name} is on {part.device} but labels[0] is on {parts[0].device}; "
                             "the micro-batches' labels must share one device")
    return parts


def local_num_items(labels: LabelsArg, *, ignore_index: int = -100) -> torch.Tensor:
    """This rank's valid tokens (``labels != ignore_index``) over its micro-batches.

    A 0-dim int64 tensor on the labels' device; nothing is read on the host.
    """
    ignore_index = check_int("ignore_index", ignore_index)
    parts = _label_list(labels)
    counts = [(part != ignore_index).sum() for part in parts]
    return counts[0] if len(counts) == 1 else torch.stack(counts).sum()


def global_num_items(labels: LabelsArg, *, ignore_index: int = -100,
                     group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """The step's number of valid tokens over the data-parallel group and the micro-batches.

    Pass it as ``num_items`` to every loss call of the step and multiply each loss by the
    group's size when DDP/FSDP average gradients (see this module's docstring for why):

        n = global_num_items([mb.labels for mb in step_micro_batches])
        for mb in step_micro_batches:
            loss = fastkd.kd_loss(s, t, mb.labels, num_items=n) * dist.get_world_size()

    Args:
        labels: this rank's labels for the whole step: one tensor, or a list/tuple with one
            tensor per gradient-accumulation micro-batch (any shapes), exactly as the loss
            will see them (already shifted for a causal LM).
        ignore_index: the loss's ``ignore_index``.
        group: the data-parallel process group (default: the world). Under tensor or
            context parallelism pass the *data-parallel* group: ranks that hold the same
            tokens (a tensor-parallel group) must not count them twice.

    Returns:
        A 0-dim int64 tensor on the labels' device: the global count, at least 1 (a step
        with no valid token gives a zero loss, as ``kd_loss``'s own mean does). One
        ``all_reduce`` when ``torch.distributed`` is initialised with more than one rank
        in ``group``; none otherwise. It is never read on the host, so with NCCL (labels on
        the GPU) it costs no synchronisation.
    """
    count = local_num_items(labels, ignore_index=ignore_index)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count.clamp_min(1)
