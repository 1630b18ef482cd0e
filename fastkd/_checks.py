"""Checks of the tensors of one call (shapes, dtypes, devices, labels, ``num_items``).

The settings are checked once, without tensors, in ``fastkd/config.py``; these checks take
a validated :class:`KDConfig` and fix what only the tensors can tell (``vocab_size``).
Each is written for one quantity, so ``kd_loss`` (logits) and ``fused_linear_kd_loss``
(hidden states and LM heads) share them.
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import torch

from .config import KDConfig, check_number, is_concrete, traced_check

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_float_tensor(name: str, x, what: str = "[..., V]") -> None:
    """A floating tensor with at least one dimension (``what`` names its expected shape)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float64, bfloat16 or float16), got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have shape {what} with at least one dimension, got a 0-dim tensor")


def check_logits(name: str, x) -> None:
    check_float_tensor(name, x)
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (shape {tuple(x.shape)}); V must be >= 1")


def check_same_tokens(student_name: str, student, teacher_name: str, teacher) -> None:
    """Same leading (token) shape, same device, and a teacher that is a constant."""
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"{student_name} and {teacher_name} must have the same leading (token) shape, "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.device != teacher.device:
        raise ValueError(f"{student_name} is on {student.device} but {teacher_name} is on {teacher.device}")
    check_teacher_is_constant(teacher_name, teacher)


def resolve_vocab_size(cfg: KDConfig, student_width: int, teacher_width: int,
                       student_name: str = "student_logits", teacher_name: str = "teacher_logits") -> KDConfig:
    """``cfg`` with ``vocab_size`` fixed from the two sides' vocabulary widths."""
    vocab_size = cfg.vocab_size
    if vocab_size is None:
        if student_width != teacher_width:
            raise ValueError(
                f"vocab sizes differ: {student_name} has {student_width} columns, {teacher_name} has "
                f"{teacher_width}; pass vocab_size= to use only the first vocab_size columns of each")
        vocab_size = student_width
    elif vocab_size > min(student_width, teacher_width):
        raise ValueError(
            f"vocab_size must be in [1, {min(student_width, teacher_width)}] (the smaller of the student's "
            f"{student_width} and teacher's {teacher_width} columns), got {vocab_size}")
    return cfg.with_vocab_size(vocab_size)


def check_logits_pair(student, teacher, cfg: KDConfig) -> KDConfig:
    """Dtypes, shapes, devices and vocabulary widths of the two logits; returns ``cfg``
    with ``vocab_size`` fixed."""
    check_logits("student_logits", student)
    check_logits("teacher_logits", teacher)
    check_same_tokens("student_logits", student, "teacher_logits", teacher)
    return resolve_vocab_size(cfg, student.shape[-1], teacher.shape[-1])


def check_label_tensor(labels, lead_shape, device, inputs: str, last_dim: str) -> None:
    """Type, integer dtype, shape (``inputs``' shape without its ``last_dim`` dimension) and
    device of a labels tensor; shared by kd_loss (which also range-checks them) and the
    feature losses (which read them only as a mask)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 (or int32) tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(
            f"labels must have shape {tuple(lead_shape)} (the {inputs}' shape without the {last_dim} "
            f"dimension), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the {inputs} are on {device}")


def check_teacher_is_constant(teacher_name: str, teacher: torch.Tensor) -> None:
    if teacher.requires_grad:
        raise ValueError(
            f"{teacher_name} requires grad, but the teacher is a constant in distillation: "
            "compute it under torch.no_grad() or pass .detach()")


def check_labels(labels, lead_shape, device, cfg: KDConfig) -> None:
    """Presence, shape, dtype, device and (on CPU, where it costs no sync) range of the labels."""
    if labels is None:
        if not is_concrete(cfg.alpha):
            traced_check(cfg.alpha == 1.0, lambda: "alpha != 1 mixes in a hard-label cross-entropy, "
                                                   "which needs labels")
        elif cfg.alpha != 1.0:
            raise ValueError(
                f"alpha={cfg.alpha} mixes in a hard-label cross-entropy, which needs labels; "
                "pass labels= or use alpha=1.0")
        return
    check_label_tensor(labels, lead_shape, device, "logits", "vocab")
    # The range check reads the labels: free on the CPU, a host sync on a GPU, and a
    # data-dependent branch under torch.compile. Where it is skipped, the kernels mark a
    # row whose label is out of range with a NaN loss, so it is never silently a number.
    if labels.device.type == "cpu" and labels.numel() > 0 and not torch.compiler.is_compiling():
        bad = (labels != cfg.ignore_index) & ((labels < 0) | (labels >= cfg.vocab_size))
        if bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(
                f"labels must be in [0, {cfg.vocab_size}) or equal ignore_index={cfg.ignore_index}; "
                f"found {first}")


def check_num_items(num_items, reduction: str):
    """None, a positive number, or a one-element tensor.

    A tensor on the CPU is read on the host (free, and no blocking copy to the GPU later);
    a tensor on a GPU stays there, unchecked, since reading it would synchronise.
    """
    if num_items is None:
        return None
    if reduction != "mean":
        raise ValueError(f"num_items only applies to reduction='mean', got reduction={reduction!r}")
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items must be a number or a one-element tensor, got shape {tuple(num_items.shape)}")
        if num_items.device.type != "cpu" or torch.compiler.is_compiling():
            return num_items
        num_items = num_items.item()
    elif isinstance(num_items, bool) or not isinstance(num_items, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"num_items must be a number or a tensor, got {type(num_items).__name__}")
    return check_number("num_items", num_items, low=0.0, low_open=True)


def check_kd_args(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor], cfg: KDConfig,
                  num_items=None):
    """The tensors of one ``kd_loss`` call against a config: (config with vocab_size, num_items)."""
    cfg = check_logits_pair(student, teacher, cfg)
    check_labels(labels, student.shape[:-1], student.device, cfg)
    return cfg, check_num_items(num_items, cfg.reduction)


def reduction_scale(
    labels: Optional[torch.Tensor],
    n_rows: int,
    cfg: KDConfig,
    num_items: Union[None, float, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The factor that turns the sum of per-row losses into the reduced loss.

    Returned as a device scalar of ``dtype`` (float32, or float64 for float64 logits;
    never synchronised to the host), so the kernels can fold it into the gradient they
    write. ``num_items`` is as :func:`check_num_items` returns it.
    """
    if cfg.reduction in ("sum", "none"):
        return torch.ones((), dtype=dtype, device=device)
    if cfg.reduction == "batchmean" or (num_items is None and labels is None):
        return torch.full((), 1.0, dtype=dtype, device=device) / torch.sym_max(n_rows, 1)
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            return num_items.detach().to(device=device, dtype=dtype).reshape(()).reciprocal()
        return torch.full((), 1.0, dtype=dtype, device=device) / num_items
    n_valid = (labels != cfg.ignore_index).sum().clamp_min(1)
    return n_valid.to(dtype).reciprocal()


# ---------------------------------------------------------------------------------------
# Sparse teachers: K ids and their log-probabilities per token (fastkd/sparse.py).

ID_DTYPES = (torch.int32, torch.int64)


def check_sparse_teacher(teacher_ids, teacher_logprobs, lead_shape, device) -> None:
    """Types, dtypes, shapes ``[..., K]`` and devices of a sparse teacher; constant log-probs."""
    if not isinstance(teacher_ids, torch.Tensor):
        raise TypeError(f"teacher_ids must be a torch.Tensor, got {type(teacher_ids).__name__}")
    if teacher_ids.dtype not in ID_DTYPES:
        raise TypeError(f"teacher_ids must be an int32 or int64 tensor, got {teacher_ids.dtype}")
    check_float_tensor("teacher_logprobs", teacher_logprobs, "[..., K]")
    if teacher_ids.dim() == 0 or tuple(teacher_ids.shape[:-1]) != tuple(lead_shape):
        raise ValueError(f"teacher_ids must have shape [..., K] with leading shape {tuple(lead_shape)} (the "
                         f"student's token shape), got {tuple(teacher_ids.shape)}")
    if tuple(teacher_logprobs.shape) != tuple(teacher_ids.shape):
        raise ValueError(f"teacher_logprobs must have the shape of teacher_ids {tuple(teacher_ids.shape)}, "
                         f"got {tuple(teacher_logprobs.shape)}")
    for name, x in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the student is on {device}")
    check_teacher_is_constant("teacher_logprobs", teacher_logprobs)


def check_sparse_ids(teacher_ids: torch.Tensor, vocab_size: int) -> None:
    """On the CPU (free there; a host sync on a GPU, a data-dependent branch under
    torch.compile): every id < 0 (an empty slot) or in [0, vocab_size), and no id twice in
    one token's support. Where skipped, the kernels give such a row a NaN loss."""
    if teacher_ids.device.type != "cpu" or teacher_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    ids = teacher_ids.reshape(-1, teacher_ids.shape[-1])
    bad = ids >= vocab_size
    if bool(bad.any()):
        raise ValueError(f"teacher_ids must be in [0, {vocab_size}) (vocab_size) or < 0 for an empty slot; "
                         f"found {ids[bad][0].item()}")
    if ids.shape[-1] > 1:
        ordered = ids.sort(dim=-1).values
        dup = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        if bool(dup.any()):
            row = int(dup.any(-1).nonzero()[0, 0])
            value = ordered[row, 1:][dup[row]][0].item()
            raise ValueError(f"teacher_ids must not repeat an id within a token's support; token {row} (of the "
                             f"flattened tokens) has id {value} twice")


def check_sparse_kd_args(student, teacher_ids, teacher_logprobs, labels, cfg: KDConfig, num_items=None,
                         student_name: str = "student_logits", student_width: Optional[int] = None):
    """The tensors of one ``sparse_kd_loss`` call: (config with vocab_size, num_items).

    ``student_width`` is the student's vocabulary (the logits' last dimension by default;
    the LM head's rows for the fused-linear form, whose ``student`` is the hidden states).
    """
    if student_width is None:
        check_logits(student_name, student)
        student_width = student.shape[-1]
    lead = student.shape[:-1]
    check_sparse_teacher(teacher_ids, teacher_logprobs, lead, student.device)
    vocab_size = cfg.vocab_size
    if vocab_size is None:
        vocab_size = student_width
    elif vocab_size > student_width:
        raise ValueError(f"vocab_size must be in [1, {student_width}] (the student's vocabulary), got {vocab_size}")
    cfg = cfg.with_vocab_size(vocab_size)
    check_sparse_ids(teacher_ids, vocab_size)
    check_labels(labels, lead, student.device, cfg)
    return cfg, check_num_items(num_items, cfg.reduction)
