"""Checks of the tensors of one call (shapes, dtypes, devices, labels, ``num_items``).

The settings are checked once, without tensors, in ``fastkd/config.py``; these checks take
a validated :class:`KDConfig` and fix what only the tensors can tell (``vocab_size``).
Each is written for one quantity, so ``kd_loss`` (logits) and ``fused_linear_kd_loss``
(hidden states and LM heads) share them.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Tuple, Union

import torch

from .backends import loss_dtype
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


# ---------------------------------------------------------------------------------------
# Several teachers (docs/multi_teacher.md): teacher_logits a sequence of K tensors or one
# [K, ..., V] tensor (one more leading dimension than the student), weighted per teacher
# or per token by teacher_weights.

class Teachers(NamedTuple):
    """The teacher argument of one call, split into K teachers (:func:`as_teachers`)."""

    logits: Tuple          # K tensors [..., V_k] (not checked yet)
    weights: object        # teacher_weights as given: None, K numbers, or a [K, ...] tensor
    names: Tuple[str, ...]  # the teachers' names in errors: teacher_logits[k]

    @property
    def single(self):
        """The one teacher of a single-teacher call, else None.

        K = 1 with no weights, or with the weight 1.0, is the single-teacher loss exactly
        and runs on every backend. K = 1 with a weight tensor or another number runs as
        several teachers (a weighted divergence in ``sum`` mode; an error in ``mixture``
        mode unless the weights are 1)."""
        return self.logits[0] if is_single_teacher_call(len(self.logits), self.weights) else None


def is_single_teacher_call(K: int, weights) -> bool:
    """K = 1 teacher without weights, or with the number 1.0: the single-teacher loss."""
    if K != 1:
        return False
    return weights is None or (isinstance(weights, (list, tuple)) and len(weights) == 1
                               and isinstance(weights[0], numbers.Real) and not isinstance(weights[0], bool)
                               and weights[0] == 1.0)


def as_teachers(student, teacher_logits, teacher_weights) -> Teachers:
    """Split ``teacher_logits`` into its teachers: a sequence of K tensors, a tensor with one
    more dimension than ``student`` (``[K, ..., V]``, K stacked teachers), or one teacher
    (any other value, checked as today's single teacher)."""
    if isinstance(teacher_logits, (list, tuple)):
        if len(teacher_logits) == 0:
            raise ValueError("teacher_logits is an empty sequence; pass one tensor [..., V] or a sequence of "
                             "K >= 1 tensors")
        logits = tuple(teacher_logits)
    elif (isinstance(teacher_logits, torch.Tensor) and isinstance(student, torch.Tensor)
          and teacher_logits.dim() == student.dim() + 1):
        if tuple(teacher_logits.shape[1:-1]) != tuple(student.shape[:-1]) or teacher_logits.shape[0] == 0:
            raise ValueError(
                f"teacher_logits of shape {tuple(teacher_logits.shape)} has one more dimension than "
                f"student_logits {tuple(student.shape)}, so it is K stacked teachers [K, ..., V]: its shape must "
                f"be [K] + the student's token shape {tuple(student.shape[:-1])} + [V] with K >= 1")
        check_teacher_is_constant("teacher_logits", teacher_logits)
        logits = tuple(teacher_logits.unbind(0))
    else:
        return Teachers((teacher_logits,), teacher_weights, ("teacher_logits",))
    return Teachers(logits, teacher_weights, tuple(f"teacher_logits[{k}]" for k in range(len(logits))))


def check_teacher_weights(weights, K: int, lead_shape, device, labels, cfg: KDConfig):
    """None (uniform 1/K), K numbers, or a ``[K, ...]`` tensor of per-token weights; >= 0,
    and summing to 1 per token in ``mixture`` mode. Returns them checked (numbers as floats).

    The values of a tensor are checked where that is free: on the CPU, outside
    torch.compile, and only at counted tokens (an ignored token's weights do not matter).
    A GPU tensor is not read (that would be a host sync): negative weights or weights
    that do not sum to 1 there give a wrong (or NaN, for a negative mixture weight) loss.
    """
    mixture = cfg.teacher_mode == "mixture"
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor):
        if weights.is_complex():  # floats, or integers / bools (a one-hot routing from F.one_hot)
            raise TypeError(f"teacher_weights must be a real tensor, got {weights.dtype}")
        want = (K,) + tuple(lead_shape)
        if tuple(weights.shape) != want:
            raise ValueError(f"teacher_weights must have shape [K, ...] = {want} (one weight per teacher and "
                             f"token; K = {K} teachers), got {tuple(weights.shape)}")
        if weights.device != device:
            raise ValueError(f"teacher_weights are on {weights.device} but the logits are on {device}")
        if weights.requires_grad:
            raise ValueError("teacher_weights requires grad, but the weights are constants (no gradient flows "
                             "to them): pass .detach()")
        if weights.device.type != "cpu" or weights.numel() == 0 or torch.compiler.is_compiling():
            return weights
        w = weights.reshape(K, -1).double()
        counted = torch.ones(w.shape[1], dtype=torch.bool)
        if labels is not None:
            counted = labels.reshape(-1) != cfg.ignore_index
        bad = ~(torch.isfinite(w) & (w >= 0)) & counted
        if bool(bad.any()):
            k, i = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"teacher_weights must be finite and >= 0, found {w[k, i].item()} (teacher {k}, "
                             f"token {i} of the flattened tokens)")
        if mixture:
            total = w.sum(0)
            off = ((total - 1).abs() > mixture_tolerance(K, weights.dtype)) & counted
            if bool(off.any()):
                i = int(off.nonzero()[0, 0])
                raise ValueError(_SUM_TO_ONE + f", found {total[i].item()} at token {i} of the flattened tokens; "
                                 "use teacher_mode='sum' for a weighted sum of divergences")
        return weights
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"teacher_weights must be None, a sequence of K numbers or a [K, ...] tensor, got "
                        f"{type(weights).__name__}")
    if len(weights) != K:
        raise ValueError(f"teacher_weights has {len(weights)} entries but there are {K} teachers (teacher_logits)")
    values = tuple(check_number(f"teacher_weights[{k}]", w, low=0.0) for k, w in enumerate(weights))
    if not mixture:
        return values
    total = sum(values)
    if is_concrete(total):
        if abs(total - 1.0) > mixture_tolerance(K, None):
            raise ValueError(_SUM_TO_ONE + f", got {list(values)} (sum {total}); use teacher_mode='sum' for a "
                             "weighted sum of divergences")
    else:
        traced_check(abs(total - 1.0) <= mixture_tolerance(K, None), lambda: _SUM_TO_ONE)
    return values


_SUM_TO_ONE = ("teacher_weights must sum to 1 over the teachers for teacher_mode='mixture' (they weigh a "
               "mixture of distributions)")


def mixture_tolerance(K: int, dtype: Optional[torch.dtype]) -> float:
    """How far from 1 mixture weights may sum: 1e-6, or K rounding errors of a low-precision
    weights tensor (1/3 in bfloat16 is 0.3340). Python numbers: 1e-6. The weights are used as
    given, never renormalised."""
    if dtype is None or not dtype.is_floating_point:
        return 1e-6
    return max(1e-6, K * torch.finfo(dtype).eps)


def teacher_weight_rows(weights, K: int, n_rows: int, device, dtype: torch.dtype) -> torch.Tensor:
    """The checked ``teacher_weights`` (:func:`check_teacher_weights`) as the backends take them: ``[K, N]`` of ``dtype`` (the
    loss dtype). Constant weights are a ``[K, 1]`` tensor expanded along N (stride 0), built
    on the device without a host-to-device copy (which would synchronise)."""
    if weights is None:
        return torch.full((K, 1), 1.0 / K, dtype=dtype, device=device).expand(K, n_rows)
    if isinstance(weights, torch.Tensor):
        return weights.detach().reshape(K, n_rows).to(dtype)
    one = torch.ones((), dtype=dtype, device=device)  # a product keeps a traced weight symbolic
    return torch.stack([one * w for w in weights]).reshape(K, 1).expand(K, n_rows)


def check_multi_kd_args(student, teachers: Teachers, labels, cfg: KDConfig, num_items=None):
    """The tensors of a ``kd_loss`` call with several teachers: (config with vocab_size,
    weights [K, N], num_items). Each teacher is checked as the single one is (dtype, token
    shape, device, a constant); their widths may differ (then ``vocab_size`` is needed)."""
    check_logits("student_logits", student)
    for name, t in zip(teachers.names, teachers.logits):
        check_logits(name, t)
        check_same_tokens("student_logits", student, name, t)
    # Each teacher against the settings as given: every width must match the student's,
    # or vocab_size fit them all.
    resolved = [resolve_vocab_size(cfg, student.shape[-1], t.shape[-1], "student_logits", name)
                for name, t in zip(teachers.names, teachers.logits)]
    cfg = resolved[0]
    lead = student.shape[:-1]
    check_labels(labels, lead, student.device, cfg)
    K = len(teachers.logits)
    weights = check_teacher_weights(teachers.weights, K, lead, student.device, labels, cfg)
    weights = teacher_weight_rows(weights, K, lead.numel(), student.device, loss_dtype(student, *teachers.logits))
    return cfg, weights, check_num_items(num_items, cfg.reduction)


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
