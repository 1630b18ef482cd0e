"""The case lists, as PyTorch's OpInfo has them: one list of sample inputs per op, checked
by every backend, and one list of bad inputs per op (:class:`ErrorCase`).

A :class:`Case` describes a ``kd_loss`` call (shapes, dtypes, special entries, keywords);
a :class:`LinearCase` a ``fused_linear_kd_loss`` call. ``harness.inputs`` draws their
tensors, ``harness.compare`` checks a backend against the float64 reference on them, and
``harness.registry`` ties each op to its lists.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple, Type, Union

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "batchmean", "none")


@dataclass(frozen=True)
class Case:
    lead: Tuple[int, ...] = (37,)       # token dims: [N] or [B, S]
    vocab: int = 1001                   # odd, not a power of two
    student_dtype: torch.dtype = torch.float32
    teacher_dtype: Optional[torch.dtype] = None  # None: same as the student
    divergence: str = "forward_kl"
    temperature: float = 2.0
    beta: float = 0.5
    alpha: float = 1.0
    t_squared: bool = True
    reduction: str = "mean"
    labels: bool = True
    ignore_frac: float = 0.2            # fraction of tokens with label == ignore_index
    neg_inf: Optional[str] = None       # None | "both" | "teacher" | "student": masked vocab entries
    nan_row: bool = False               # a NaN in one valid student row
    teacher_pad: int = 0                # extra teacher columns past vocab_size
    vocab_size: Optional[int] = None
    noncontiguous: bool = False
    num_items: Optional[float] = None
    inplace: bool = False
    options: Tuple[Tuple[str, Any], ...] = ()  # logit options (softcap, label_smoothing, ...) as pairs

    @property
    def id(self) -> str:
        parts = [self.divergence, self.reduction, str(self.student_dtype).split(".")[-1],
                 f"T{self.temperature}", f"a{self.alpha}"]
        if self.divergence == "jsd":
            parts.append(f"b{self.beta}")
        defaults = Case()
        for f in ("lead", "vocab", "teacher_dtype", "t_squared", "labels", "ignore_frac", "neg_inf",
                  "nan_row", "teacher_pad", "vocab_size", "noncontiguous", "num_items", "inplace"):
            if getattr(self, f) != getattr(defaults, f):
                parts.append(f"{f}={getattr(self, f)}".replace(" ", ""))
        parts += [f"{k}={v}" for k, v in self.options]
        return "-".join(parts)

    @property
    def dtypes(self) -> Tuple[torch.dtype, ...]:
        return (self.student_dtype, self.teacher_dtype or self.student_dtype)

    def replace(self, **kw) -> "Case":
        return dataclasses.replace(self, **kw)

    def kwargs(self) -> dict:
        return dict(divergence=self.divergence, temperature=self.temperature, beta=self.beta,
                    alpha=self.alpha, t_squared=self.t_squared, reduction=self.reduction,
                    num_items=self.num_items, vocab_size=self.vocab_size, **dict(self.options))


@dataclass(frozen=True)
class LinearCase:
    lead: Tuple[int, ...] = (37,)
    hs: int = 32                      # student hidden size
    ht: int = 48                      # teacher hidden size (differs on purpose)
    vocab: int = 1001                 # odd
    student_pad: int = 0              # extra student head rows past vocab_size
    teacher_pad: int = 0              # extra teacher head rows past vocab_size
    dtype: torch.dtype = torch.float64
    divergence: str = "forward_kl"
    temperature: float = 2.0
    beta: float = 0.5
    alpha: float = 0.6
    reduction: str = "mean"
    labels: bool = True
    bias: bool = True
    num_items: Optional[float] = None
    chunk_size: object = 10           # 37 tokens -> 4 chunks
    options: Tuple[Tuple[str, Any], ...] = ()  # logit options as pairs, as Case.options

    @property
    def id(self) -> str:
        defaults = LinearCase()
        return "-".join(f"{k}={v}" for k, v in self.__dict__.items() if v != getattr(defaults, k)) or "default"

    @property
    def dtypes(self) -> Tuple[torch.dtype, ...]:
        return (self.dtype,)

    def replace(self, **kw) -> "LinearCase":
        return dataclasses.replace(self, **kw)

    def kwargs(self):
        pad = self.student_pad or self.teacher_pad
        return dict(divergence=self.divergence, temperature=self.temperature, beta=self.beta,
                    alpha=self.alpha, reduction=self.reduction, num_items=self.num_items,
                    vocab_size=self.vocab if pad else None, **dict(self.options))


@dataclass(frozen=True)
class ErrorCase:
    """One bad input of an op: how to break the op's good input, and what must be raised.

    ``change`` replaces arguments of the good input (tensors and keywords alike, by the
    op's parameter names); a callable value is called with the good arguments and returns
    the replacement (``lambda a: a["teacher_logits"][:3]``). ``per_backend``: run once per
    backend of the op's error list (False: the change names the backend itself).
    ``module``: construct the op's nn.Module with ``change`` as its settings instead.
    """
    op: str
    name: str
    change: Mapping[str, Any]
    exc: Union[Type[BaseException], Tuple[Type[BaseException], ...]]
    match: str
    per_backend: bool = True
    module: bool = False

    def arguments(self, good: dict) -> dict:
        args = dict(good)
        for key, value in self.change.items():
            args[key] = value(good) if callable(value) else value
        return args


# ---------------------------------------------------------------------------------------
# kd_loss: the sample inputs. Each list is small enough for the Triton interpreter on a CPU.

BASE = Case(alpha=0.6)

GRID_DIV_RED_DTYPE = [
    BASE.replace(divergence=d, reduction=r, student_dtype=dt)
    for d, r, dt in itertools.product(DIVERGENCES, REDUCTIONS, (torch.float32, torch.bfloat16, torch.float16))
]

GRID_TEMPERATURE = [
    Case(divergence=d, temperature=T, alpha=a)
    for d, T, a in itertools.product(DIVERGENCES, (0.5, 1.0, 2.0, 4.0), (1.0, 0.6))
]

GRID_BETA = [
    Case(divergence="jsd", beta=b, alpha=a)
    for b, a in itertools.product((0.0, 0.1, 0.5, 0.9, 1.0), (1.0, 0.6))
]

SPECIAL = [
    Case(lead=(3, 13)),                                           # [batch, seq, V]
    Case(lead=(3, 13), divergence="jsd", reduction="none"),
    Case(noncontiguous=True, alpha=0.6),
    Case(lead=(3, 7), noncontiguous=True, divergence="reverse_kl"),
    Case(ignore_frac=1.0, alpha=0.6),                              # all ignored: loss 0, grad 0
    Case(ignore_frac=1.0, reduction="none"),
    Case(lead=(0,)),                                              # empty batch
    Case(lead=(0,), reduction="sum"),
    Case(labels=False),
    Case(labels=False, reduction="sum", t_squared=False),
    Case(student_dtype=torch.bfloat16, teacher_dtype=torch.float32),
    Case(student_dtype=torch.float32, teacher_dtype=torch.bfloat16, divergence="jsd"),
    Case(student_dtype=torch.float16, teacher_dtype=torch.bfloat16, divergence="reverse_kl"),
    Case(teacher_pad=7, vocab_size=1001, alpha=0.6),                # padded teacher vocabulary
    Case(teacher_pad=3, vocab_size=990, divergence="tvd"),          # both sides cut
    Case(num_items=50.0, alpha=0.6),
    Case(inplace=True, alpha=0.6),
    Case(inplace=True, divergence="jsd", student_dtype=torch.bfloat16),
    Case(inplace=True, lead=(2, 9), divergence="tvd", reduction="none"),
    Case(vocab=3, lead=(5,)),
    Case(vocab=1, lead=(4,), divergence="reverse_kl"),              # one-entry vocabulary: D = 0
] + [
    Case(divergence=d, neg_inf=where, alpha=0.6)
    for d, where in [("forward_kl", "both"), ("reverse_kl", "both"), ("jsd", "both"), ("tvd", "both"),
                     ("forward_kl", "teacher"), ("jsd", "teacher"), ("tvd", "teacher"),
                     ("reverse_kl", "student"), ("jsd", "student"), ("tvd", "student")]
] + [
    Case(divergence=d, nan_row=True, reduction=r)
    for d, r in [("forward_kl", "none"), ("jsd", "mean"), ("reverse_kl", "sum"), ("tvd", "none")]
]

# The logit options (issue 13): each alone, then combined, over the divergences, dtypes,
# padded vocabularies, -inf entries and ignored tokens. The logits are drawn with a spread
# of a few units, so a cap of 2 saturates some entries (tanh' far from 1) and 1e4 none.
_CAP = (("softcap", 2.0),)
_ALL = (("logit_scale", 1.5), ("softcap", 3.0), ("teacher_logit_scale", 0.7), ("teacher_softcap", 5.0),
        ("label_smoothing", 0.1), ("z_loss", 1e-3))
LOGIT_OPTION_CASES = [
    Case(alpha=0.6, options=_CAP),
    Case(alpha=0.6, options=(("softcap", 1e4),)),
    Case(alpha=0.6, options=(("logit_scale", 0.5),)),
    Case(alpha=0.6, options=(("softcap", 2.0), ("teacher_softcap", None))),
    Case(alpha=0.6, options=(("teacher_logit_scale", 2.0), ("teacher_softcap", 4.0))),
    Case(alpha=0.3, options=(("label_smoothing", 0.1),)),
    Case(alpha=0.0, options=(("label_smoothing", 1.0),)),
    Case(alpha=1.0, labels=False, options=(("z_loss", 1e-2),)),
    Case(alpha=0.6, temperature=1.0, options=(("z_loss", 1e-2), ("label_smoothing", 0.2))),
    Case(alpha=1.0, options=(("z_loss", 1e-2), ("softcap", 2.0))),
    Case(alpha=0.6, reduction="none", options=(("z_loss", 1e-2), ("softcap", 2.0))),
    Case(alpha=0.6, student_dtype=torch.bfloat16, options=_ALL),
    Case(alpha=0.6, student_dtype=torch.float16, teacher_dtype=torch.bfloat16, divergence="jsd", options=_ALL),
    Case(alpha=0.6, teacher_pad=3, vocab_size=990, options=_ALL),
    Case(alpha=0.6, neg_inf="both", divergence="reverse_kl", options=(("softcap", 2.0), ("z_loss", 1e-3))),
    Case(alpha=0.6, inplace=True, divergence="tvd", options=_ALL),
] + [
    Case(divergence=d, alpha=0.6, temperature=T, options=_ALL)
    for d, T in itertools.product(DIVERGENCES, (0.5, 2.0))
]
# 11 rows (some ignored, some peaked) rather than the default 37: these run on the Triton
# interpreter too, whose time grows with the rows.
LOGIT_OPTION_CASES = [c.replace(lead=(11,)) if c.lead == Case().lead else c for c in LOGIT_OPTION_CASES]

ALL_CASES = GRID_DIV_RED_DTYPE + GRID_TEMPERATURE + GRID_BETA + SPECIAL + LOGIT_OPTION_CASES

# fp32 centred divergences at a real vocabulary size: the gradient must be within
# fp32_grad_tolerance (1e-5, or 2x PyTorch's fp32 error) of float64. Pure divergence (no
# CE term to dilute the error); four rows, so that the Triton interpreter runs them too.
LARGE_VOCAB_CENTRED = [
    Case(lead=(4,), vocab=32000, divergence=d, temperature=T, beta=b, alpha=1.0, labels=False, reduction="sum")
    for d, T, b in [("reverse_kl", 1.0, 0.5), ("reverse_kl", 0.5, 0.5), ("jsd", 2.0, 0.5), ("jsd", 1.0, 0.5),
                    ("jsd", 0.5, 0.5), ("jsd", 1.0, 0.9)]
]

# ---------------------------------------------------------------------------------------
# fused_linear_kd_loss: the sample inputs.

LINEAR_CASES = [
    LinearCase(),
    LinearCase(divergence="jsd", beta=0.3, reduction="none"),
    LinearCase(labels=False, alpha=1.0, bias=False, reduction="batchmean"),
    LinearCase(num_items=123.0, divergence="reverse_kl"),
    LinearCase(lead=(3, 7), divergence="tvd", reduction="none", chunk_size=4),
    LinearCase(student_pad=3, teacher_pad=7, divergence="jsd"),      # vocab_size= with padded heads
    LinearCase(teacher_pad=128, reduction="sum"),
    LinearCase(alpha=0.0),                                           # pure cross-entropy
    LinearCase(lead=(0,)),                                           # no tokens
    LinearCase(divergence="jsd", options=(("softcap", 2.0), ("label_smoothing", 0.1), ("z_loss", 1e-3))),
    LinearCase(student_pad=3, teacher_pad=7, options=(("logit_scale", 1.5), ("teacher_softcap", 3.0))),
]

# ---------------------------------------------------------------------------------------
# The bad inputs. kd_loss's good input: 4 rows of V = 11 (harness.inputs.small_kd_inputs),
# called as kd_loss(student_logits, teacher_logits, labels, backend=<each backend>).

V = 11


def _kd(name, exc, match, **change):
    return ErrorCase("kd_loss", name, change, exc, match)


def _kd_op(name, exc, match, module=False, **change):
    return ErrorCase("kd_loss", name, change, exc, match, per_backend=False, module=module)


KD_LOSS_ERRORS = [
    _kd("temperature=0", ValueError, "temperature must be > 0", temperature=0.0),
    _kd("temperature=-1", ValueError, "temperature", temperature=-1.0),
    _kd("temperature=nan", ValueError, "temperature must be finite", temperature=float("nan")),
    _kd("temperature=str", TypeError, "temperature", temperature="2"),
    _kd("beta=1.5", ValueError, "beta must be <= 1", beta=1.5),
    _kd("beta=-0.1", ValueError, "beta must be >= 0", beta=-0.1),
    _kd("alpha=1.2", ValueError, "alpha", alpha=1.2),
    _kd("divergence=kl", ValueError, "divergence must be one of", divergence="kl"),
    _kd("reduction=avg", ValueError, "reduction must be one of", reduction="avg"),
    _kd("vocab_size=V+1", ValueError, "vocab_size must be in", vocab_size=V + 1),
    _kd("vocab_size=0", ValueError, "vocab_size must be in", vocab_size=0),
    _kd("vocab_size=float", TypeError, "vocab_size must be an int", vocab_size=3.0),
    _kd("num_items=0", ValueError, "num_items must be > 0", num_items=0),
    _kd("num_items-with-sum", ValueError, "num_items only applies", num_items=5, reduction="sum"),
    _kd("ignore_index=float", TypeError, "ignore_index", ignore_index=1.5),
    _kd("t_squared=int", TypeError, "t_squared", t_squared=1),
    _kd("inplace_backward=str", TypeError, "inplace_backward", inplace_backward="yes"),
    _kd("alpha-without-labels", ValueError, "alpha=0.5 .* needs labels", labels=None, alpha=0.5),
    _kd("mismatched-token-shapes", ValueError, "same leading", teacher_logits=lambda a: a["teacher_logits"][:3]),
    _kd("mismatched-vocab", ValueError, "pass vocab_size=", teacher_logits=lambda a: torch.randn(4, V + 2)),
    _kd("labels-short", ValueError, "labels must have shape", labels=torch.zeros(3, dtype=torch.long)),
    _kd("labels-extra-dim", ValueError, "labels must have shape", labels=torch.zeros(4, 1, dtype=torch.long)),
    _kd("labels-float", TypeError, "labels must be an int64", labels=torch.zeros(4)),
    _kd("labels-list", TypeError, "labels must be a torch.Tensor", labels=[0, 1, 2, 3]),
    _kd("labels=V", ValueError, r"labels must be in \[0, 11\)", labels=torch.tensor([0, 1, 2, V])),
    _kd("labels=-1", ValueError, "found -1", labels=torch.tensor([0, -1, 2, 3])),
    _kd("labels-past-vocab_size", ValueError, r"labels must be in \[0, 9\)",
        teacher_logits=lambda a: torch.randn(4, V + 3), labels=torch.tensor([0, 1, 9, 2]), vocab_size=9),
] + [
    _kd(f"{side}-logits-{str(dtype).split('.')[-1]}", TypeError, f"{side}_logits must be a floating tensor",
        labels=None, **{f"{side}_logits": lambda a, dtype=dtype: torch.ones(4, V, dtype=dtype),
                        f"{other}_logits": lambda a: torch.randn(4, V)})
    for dtype in (torch.int64, torch.int32, torch.bool)
    for side, other in (("student", "teacher"), ("teacher", "student"))
] + [
    _kd("zero-dim", ValueError, "0-dim", student_logits=torch.tensor(1.0), teacher_logits=torch.tensor(1.0),
        labels=None),
    _kd("non-tensor", TypeError, "student_logits must be a torch.Tensor", student_logits=[[1.0, 2.0]],
        teacher_logits=lambda a: torch.randn(1, 2), labels=None),
    _kd("teacher-requires-grad", ValueError, "teacher_logits requires grad",
        teacher_logits=lambda a: a["teacher_logits"].requires_grad_(True)),
    _kd("empty-vocabulary", ValueError, "empty vocabulary dimension", labels=None,
        student_logits=lambda a: torch.randn(4, 0, requires_grad=True), teacher_logits=lambda a: torch.randn(4, 0)),
] + [
    # A tensor num_items on the CPU is read on the host and checked like the number.
    _kd(f"num_items={bad}", ValueError, "num_items must be > 0", num_items=bad)
    for bad in (torch.tensor(0), torch.tensor(0.0), torch.tensor(-3.0))
] + [
    _kd_op("unknown-backend", ValueError, "backend must be one of", backend="gpu"),
    _kd_op("backend-for-wrong-device", ValueError, "cuda", backend="cuda"),
    # KDLoss checks its settings at construction.
    _kd_op("module-divergence=kl", ValueError, "divergence must be one of", module=True, divergence="kl"),
    _kd_op("module-temperature=0", ValueError, "temperature must be > 0", module=True, temperature=0.0),
    _kd_op("module-backend=gpu", ValueError, "backend must be one of", module=True, backend="gpu"),
]


# fused_linear_kd_loss's good input: LinearCase(dtype=float32, lead=(2, 5)) with alpha=0.6
# (harness.inputs.small_linear_inputs), called with the default backend.

def _linear(name, exc, match, module=False, **change):
    return ErrorCase("fused_linear_kd_loss", name, change, exc, match, module=module)


FUSED_LINEAR_ERRORS = [
    _linear("student_weight-hidden-size", ValueError, r"student_weight must have shape \[V, 32\]",
            student_weight=lambda a: torch.randn(1001, 31)),
    _linear("teacher_weight-hidden-size", ValueError, r"teacher_weight must have shape \[V, 48\]",
            teacher_weight=lambda a: torch.randn(1001, 32)),
    _linear("teacher_hidden-tokens", ValueError, "same leading", teacher_hidden=lambda a: torch.randn(2, 4, 48)),
    _linear("student_bias-length", ValueError, r"student_bias must have shape \[1001\]",
            student_bias=lambda a: torch.randn(1000)),
    _linear("student_bias-2d", ValueError, r"student_bias must have shape \[V\]",
            student_bias=lambda a: torch.randn(1001, 1)),
    _linear("student_weight-1d", ValueError, r"student_weight must have shape \[V, H\]",
            student_weight=lambda a: torch.randn(1001)),
    _linear("student_weight-float64", TypeError, "must match",
            student_weight=lambda a: torch.randn(1001, 32, dtype=torch.float64)),
    _linear("student_hidden-int", TypeError, "student_hidden must be a floating",
            student_hidden=torch.ones(2, 5, 32, dtype=torch.int64)),
    _linear("student_hidden-0-dim", ValueError, "0-dim", student_hidden=torch.tensor(1.0)),
    _linear("teacher_hidden-requires-grad", ValueError, "teacher_hidden requires grad",
            teacher_hidden=lambda a: torch.randn(2, 5, 48, requires_grad=True)),
    _linear("vocab-sizes-differ", ValueError, "vocab sizes differ",
            teacher_weight=lambda a: torch.randn(1000, 48), teacher_bias=None, student_bias=None),
    _linear("labels-shape", ValueError, "labels must have shape", labels=torch.zeros(2, 4, dtype=torch.int64)),
    _linear("labels-range", ValueError, r"labels must be in \[0, 1001\)", labels=torch.full((2, 5), 5000)),
    _linear("chunk_size=0", ValueError, "chunk_size", chunk_size=0),
    _linear("chunk_size=2.5", TypeError, "chunk_size", chunk_size=2.5),
    _linear("chunk_size=True", TypeError, "chunk_size", chunk_size=True),
    _linear("chunk_size=big", ValueError, "chunk_size", chunk_size="big"),
    _linear("divergence=kl", ValueError, "divergence must be one of", divergence="kl"),
    _linear("temperature=0", ValueError, "temperature must be > 0", temperature=0.0),
    _linear("alpha-without-labels", ValueError, "needs labels", labels=None, alpha=0.5),
    _linear("vocab_size=2000", ValueError, "vocab_size must be in", vocab_size=2000),
    _linear("num_items-with-sum", ValueError, "num_items only applies", num_items=3, reduction="sum"),
    _linear("backend=gpu", ValueError, "backend must be one of", backend="gpu"),
    _linear("backend=cuda", ValueError, "cuda", backend="cuda"),
    # FusedLinearKDLoss checks its settings at construction.
    _linear("module-divergence=kl", ValueError, "divergence must be one of", module=True, divergence="kl"),
]
