"""Argument checking and normalisation shared by every entry point.

Every public function (``kd_loss``, ``fused_linear_kd_loss``, the reference) funnels its
keywords through :func:`check_kd_args`, so a bad argument gets the same error wherever it
is passed, and the kernels receive one normalised :class:`KDConfig`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "batchmean", "none")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class KDConfig:
    """The loss, after validation, in the form the kernels use.

    ``divergence`` is already resolved: ``jsd`` with beta 0 or 1 has become
    ``forward_kl`` / ``reverse_kl`` (TRL's special cases, which the general formula
    does not reduce to). ``div_weight`` = alpha * (T^2 if t_squared else 1) multiplies
    the divergence, ``ce_weight`` = 1 - alpha multiplies the hard-label CE.
    """

    divergence: str
    temperature: float
    beta: float
    alpha: float
    div_weight: float
    ce_weight: float
    ignore_index: int
    reduction: str
    vocab_size: int

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature


def resolve_divergence(divergence: str, beta: float) -> str:
    if divergence == "jsd" and beta == 0.0:
        return "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl"
    return divergence


def _check_number(name: str, value, *, low=None, high=None, low_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def _check_logits(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, float64, bfloat16 or float16), "
            f"got {x.dtype}"
        )
    if x.dim() == 0:
        raise ValueError(f"{name} must have shape [..., V] with at least one dimension, got a 0-dim tensor")


def check_labels(labels, lead_shape, device, vocab_size: int, ignore_index: int) -> None:
    """Shape, dtype, device and (on CPU, where it costs no sync) range of the labels."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 (or int32) tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(
            f"labels must have shape {tuple(lead_shape)} (the logits' shape without the vocab "
            f"dimension), got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the logits are on {device}")
    # The range check reads the labels: free on the CPU, a host sync on a GPU, and a
    # data-dependent branch under torch.compile. Where it is skipped, the kernels mark a
    # row whose label is out of range with a NaN loss, so it is never silently a number.
    if labels.device.type == "cpu" and labels.numel() > 0 and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
        if bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(
                f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
                f"found {first}"
            )


def check_kd_args(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    divergence: str,
    temperature: float,
    beta: float,
    alpha: float,
    t_squared: bool,
    ignore_index: int,
    reduction: str,
    num_items,
    vocab_size: Optional[int],
    check_teacher_grad: bool = True,
    student_name: str = "student_logits",
    teacher_name: str = "teacher_logits",
) -> KDConfig:
    """Validate the logits and keywords of a KD loss; return the normalised config."""
    _check_logits(student_name, student)
    _check_logits(teacher_name, teacher)
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"{student_name} and {teacher_name} must have the same leading (token) shape, "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(f"{student_name} is on {student.device} but {teacher_name} is on {teacher.device}")
    if check_teacher_grad and teacher.requires_grad:
        raise ValueError(
            f"{teacher_name} requires grad, but the teacher is a constant in distillation: "
            "compute it under torch.no_grad() or pass .detach()"
        )
    vs, vt = student.shape[-1], teacher.shape[-1]
    if vocab_size is None:
        if vs != vt:
            raise ValueError(
                f"vocab sizes differ: {student_name} has {vs} columns, {teacher_name} has {vt}; "
                "pass vocab_size= to use only the first vocab_size columns of each"
            )
        vocab_size = vs
    else:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
        if vocab_size < 1 or vocab_size > min(vs, vt):
            raise ValueError(
                f"vocab_size must be in [1, {min(vs, vt)}] (the smaller of the student's {vs} and "
                f"teacher's {vt} columns), got {vocab_size}"
            )

    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    temperature = _check_number("temperature", temperature, low=0.0, low_open=True)
    beta = _check_number("beta", beta, low=0.0, high=1.0)
    alpha = _check_number("alpha", alpha, low=0.0, high=1.0)
    if not isinstance(t_squared, bool):
        raise TypeError(f"t_squared must be a bool, got {type(t_squared).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")

    if labels is None:
        if alpha != 1.0:
            raise ValueError(
                f"alpha={alpha} mixes in a hard-label cross-entropy, which needs labels; "
                "pass labels= or use alpha=1.0"
            )
    else:
        check_labels(labels, student.shape[:-1], student.device, vocab_size, ignore_index)

    if num_items is not None:
        if reduction != "mean":
            raise ValueError(f"num_items only applies to reduction='mean', got reduction={reduction!r}")
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1:
                raise ValueError(f"num_items must be a number or a one-element tensor, got shape {tuple(num_items.shape)}")
        elif isinstance(num_items, bool) or not isinstance(num_items, (int, float)):
            raise TypeError(f"num_items must be a number or a tensor, got {type(num_items).__name__}")
        elif not num_items > 0:
            raise ValueError(f"num_items must be > 0, got {num_items}")

    div_weight = alpha * (temperature * temperature if t_squared else 1.0)
    return KDConfig(
        divergence=resolve_divergence(divergence, beta),
        temperature=temperature,
        beta=beta,
        alpha=alpha,
        div_weight=div_weight,
        ce_weight=1.0 - alpha,
        ignore_index=ignore_index,
        reduction=reduction,
        vocab_size=vocab_size,
    )


def reduction_scale(
    labels: Optional[torch.Tensor],
    n_rows: int,
    cfg: KDConfig,
    num_items: Union[None, int, float, torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """The factor that turns the sum of per-row losses into the reduced loss.

    Returned as a float32 device scalar (never synchronised to the host), so the kernels
    can fold it into the gradient they write.
    """
    if cfg.reduction in ("sum", "none"):
        return torch.ones((), dtype=torch.float32, device=device)
    if cfg.reduction == "batchmean":
        return torch.full((), 1.0 / max(n_rows, 1), dtype=torch.float32, device=device)
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            return num_items.detach().to(device=device, dtype=torch.float32).reshape(()).reciprocal()
        return torch.full((), 1.0 / float(num_items), dtype=torch.float32, device=device)
    if labels is None:
        return torch.full((), 1.0 / max(n_rows, 1), dtype=torch.float32, device=device)
    n_valid = (labels != cfg.ignore_index).sum().clamp_min(1)
    return n_valid.to(torch.float32).reciprocal()
