"""Argument checking and normalisation shared by every entry point.

Two kinds of checks, kept apart:

* :func:`make_config` checks the loss *settings* (divergence, temperature, ...) and builds
  the frozen :class:`KDConfig`. It needs no tensors, so ``KDLoss`` and
  ``FusedLinearKDLoss`` validate at construction.
* :func:`check_logits_pair` / :func:`check_labels` / :func:`check_num_items` check the
  *tensors* of one call against a config.

Every check is traceable by ``torch.compile(fullgraph=True)``: where a float setting is a
symbolic value (a temperature or alpha schedule recompiled with dynamic shapes), the
checks become ``torch._check`` assertions instead of Python branches on the value.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "batchmean", "none")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class KDConfig:
    """The loss settings, validated, in the form the kernels use.

    ``divergence`` is resolved where beta is a concrete number: ``jsd`` with beta 0 or 1
    becomes ``forward_kl`` / ``reverse_kl`` (TRL's special cases, which the general
    formula does not reduce to); the operators resolve it again at run time, which covers
    a beta that is symbolic under torch.compile. ``div_weight`` = alpha * (T^2 if
    t_squared else 1) multiplies the divergence, ``ce_weight`` = 1 - alpha the hard-label
    CE. ``vocab_size`` is None until a call's tensors fix it.
    """

    divergence: str
    temperature: float
    beta: float
    alpha: float
    t_squared: bool
    div_weight: float
    ce_weight: float
    ignore_index: int
    reduction: str
    vocab_size: Optional[int] = None

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature


def resolve_divergence(divergence: str, beta) -> str:
    if divergence == "jsd" and _is_concrete(beta):
        if beta == 0.0:
            return "forward_kl"
        if beta == 1.0:
            return "reverse_kl"
    return divergence


# torch.compile traces torch._check's message callable only since about torch 2.12 (a
# closure there broke the graph before); older versions get the check without the text.
_CHECK_MESSAGES_TRACEABLE = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 12)


def _traced_check(cond, message) -> None:
    if _CHECK_MESSAGES_TRACEABLE:
        torch._check(cond, message)
    else:
        torch._check(cond)


def _is_concrete(value) -> bool:
    return not isinstance(value, (torch.SymFloat, torch.SymInt, torch.SymBool)) and not torch.compiler.is_compiling()


def _check_number(name: str, value, *, low=None, high=None, low_open=False):
    """A real number (Python, numpy or symbolic under compile) in a range; returns a float."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a real number (e.g. a Python float), got {type(value).__name__}")
    if not _is_concrete(value):
        # Under torch.compile the value may be symbolic: assert instead of branching.
        _traced_check(value == value, lambda: f"{name} must be finite, got NaN")
        if low is not None:
            if low_open:
                _traced_check(value > low, lambda: f"{name} must be > {low}")
            else:
                _traced_check(value >= low, lambda: f"{name} must be >= {low}")
        if high is not None:
            _traced_check(value <= high, lambda: f"{name} must be <= {high}")
        return value
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_int(name: str, value, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        kind = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    return value if isinstance(value, torch.SymInt) else int(value)


def make_config(
    *,
    divergence: str = "forward_kl",
    temperature=1.0,
    beta=0.5,
    alpha=1.0,
    t_squared: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    vocab_size: Optional[int] = None,
) -> KDConfig:
    """Validate the loss settings (no tensors needed) and return the frozen config."""
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    temperature = _check_number("temperature", temperature, low=0.0, low_open=True)
    beta = _check_number("beta", beta, low=0.0, high=1.0)
    alpha = _check_number("alpha", alpha, low=0.0, high=1.0)
    check_bool("t_squared", t_squared)
    ignore_index = _check_int("ignore_index", ignore_index)
    vocab_size = _check_int("vocab_size", vocab_size, allow_none=True)
    if vocab_size is not None and _is_concrete(vocab_size) and vocab_size < 1:
        raise ValueError(f"vocab_size must be in [1, V] (V the number of logit columns), got {vocab_size}")
    div_weight = alpha * (temperature * temperature if t_squared else 1.0)
    return KDConfig(
        divergence=resolve_divergence(divergence, beta), temperature=temperature, beta=beta, alpha=alpha,
        t_squared=t_squared, div_weight=div_weight, ce_weight=1.0 - alpha, ignore_index=ignore_index,
        reduction=reduction, vocab_size=vocab_size,
    )


def check_logits(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, float64, bfloat16 or float16), "
            f"got {x.dtype}"
        )
    if x.dim() == 0:
        raise ValueError(f"{name} must have shape [..., V] with at least one dimension, got a 0-dim tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (shape {tuple(x.shape)}); V must be >= 1")


def check_logits_pair(student, teacher, cfg: KDConfig, *, check_teacher_grad: bool = True,
                      student_name: str = "student_logits", teacher_name: str = "teacher_logits") -> KDConfig:
    """Dtypes, shapes, devices and vocabulary widths of the two logits; returns ``cfg``
    with ``vocab_size`` fixed."""
    check_logits(student_name, student)
    check_logits(teacher_name, teacher)
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
    vocab_size = cfg.vocab_size
    if vocab_size is None:
        if vs != vt:
            raise ValueError(
                f"vocab sizes differ: {student_name} has {vs} columns, {teacher_name} has {vt}; "
                "pass vocab_size= to use only the first vocab_size columns of each"
            )
        vocab_size = vs
    elif vocab_size > min(vs, vt):
        raise ValueError(
            f"vocab_size must be in [1, {min(vs, vt)}] (the smaller of the student's {vs} and "
            f"teacher's {vt} columns), got {vocab_size}"
        )
    if vocab_size == cfg.vocab_size:
        return cfg
    # The constructor, not dataclasses.replace: torch.compile (2.4) cannot trace the latter.
    return KDConfig(divergence=cfg.divergence, temperature=cfg.temperature, beta=cfg.beta, alpha=cfg.alpha,
                    t_squared=cfg.t_squared, div_weight=cfg.div_weight, ce_weight=cfg.ce_weight,
                    ignore_index=cfg.ignore_index, reduction=cfg.reduction, vocab_size=vocab_size)


def check_labels(labels, lead_shape, device, cfg: KDConfig) -> None:
    """Presence, shape, dtype, device and (on CPU, where it costs no sync) range of the labels."""
    if labels is None:
        if not _is_concrete(cfg.alpha):
            _traced_check(cfg.alpha == 1.0, lambda: "alpha != 1 mixes in a hard-label cross-entropy, "
                                                    "which needs labels")
        elif cfg.alpha != 1.0:
            raise ValueError(
                f"alpha={cfg.alpha} mixes in a hard-label cross-entropy, which needs labels; "
                "pass labels= or use alpha=1.0"
            )
        return
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
        bad = (labels != cfg.ignore_index) & ((labels < 0) | (labels >= cfg.vocab_size))
        if bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(
                f"labels must be in [0, {cfg.vocab_size}) or equal ignore_index={cfg.ignore_index}; "
                f"found {first}"
            )


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
    return _check_number("num_items", num_items, low=0.0, low_open=True)


def check_kd_args(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    cfg: KDConfig,
    num_items=None,
    *,
    check_teacher_grad: bool = True,
    student_name: str = "student_logits",
    teacher_name: str = "teacher_logits",
):
    """The tensors of one call against a config: returns (config with vocab_size, num_items)."""
    cfg = check_logits_pair(student, teacher, cfg, check_teacher_grad=check_teacher_grad,
                            student_name=student_name, teacher_name=teacher_name)
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
