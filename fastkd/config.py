"""The loss description: every setting of a fastkd loss, validated once into a frozen config.

This file is the one place a loss setting is declared. A setting is a field of
:class:`KDConfig` whose metadata holds its check and its documentation; from those fields
come the keywords of ``kd_loss``, ``KDLoss``, ``fused_linear_kd_loss`` and
``FusedLinearKDLoss`` (their signatures and docstrings), :func:`make_config` and the
modules' ``repr``. Kernels receive the settings they read as two flat lists
(:meth:`KDConfig.kernel_settings`: a list of ints and a float64 host tensor, so that
torch.compile keeps the float settings symbolic), in the order of :data:`INT_SETTINGS`
and :data:`FLOAT_SETTINGS`; ``csrc/kd_params.h`` unpacks them in the same order (a test
compares the two).

Adding a scalar setting: a field here (with its check and doc), its name in
``INT_SETTINGS``/``FLOAT_SETTINGS`` if a kernel reads it, the same in ``kd_params.h``, and
the kernels that use it. Nothing else changes. A setting that only sparse teachers have
(``tail``) is a field of :class:`SparseKDConfig` instead, which the sparse functions list
(``takes_settings(config=SparseKDConfig)``) and ``kd_loss`` does not; its kernel ints follow
the dense ones (``SPARSE_INT_SETTINGS``).

Settings checks need no tensors, so modules validate at construction. Tensor checks
(shapes, dtypes, devices) are in ``fastkd/_checks.py``. Every check is traceable by
``torch.compile(fullgraph=True)``: where a float setting is a symbolic value (a
temperature or alpha schedule compiled with dynamic shapes), it becomes a
``torch._check`` assertion instead of a Python branch on the value.
"""
from __future__ import annotations

import array
import inspect
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Callable, List, Optional, Tuple

import torch

# The kernels' divergence ids are the positions in this tuple (csrc/kd_params.h: Divergence).
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "batchmean", "none")
# The sparse kernels' tail ids are the positions in this tuple (csrc/kd_params.h: Tail).
TAILS = ("bucket", "renorm", "none")
# How several teachers combine (docs/multi_teacher.md): the several-teachers operators'
# teacher_mode_id (MULTI_INT_SETTINGS) is the position here.
TEACHER_MODES = ("mixture", "sum")

# ---------------------------------------------------------------------------------------
# Traceable checks of one value.

# torch.compile traces torch._check's message callable only since about torch 2.12 (a
# closure there broke the graph before); older versions get the check without the text.
_CHECK_MESSAGES_TRACEABLE = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 12)


def traced_check(cond, message: Callable[[], str]) -> None:
    if _CHECK_MESSAGES_TRACEABLE:
        torch._check(cond, message)
    else:
        torch._check(cond)


def is_concrete(value) -> bool:
    """Whether Python may branch on ``value`` (not a symbolic value, not while compiling)."""
    return not isinstance(value, (torch.SymFloat, torch.SymInt, torch.SymBool)) and not torch.compiler.is_compiling()


def check_number(name: str, value, *, low=None, high=None, low_open=False):
    """A real number (Python, numpy or symbolic under compile) in a range; returns a float."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a real number (e.g. a Python float), got {type(value).__name__}")
    if not is_concrete(value):
        # No separate NaN check: the range checks below refuse NaN (every comparison with
        # NaN is false), and ``value == value`` made torch.compile specialise the value.
        if low is None and high is None:
            traced_check(value == value, lambda: f"{name} must be finite, got NaN")
        if low is not None:
            if low_open:
                traced_check(value > low, lambda: f"{name} must be > {low}")
            else:
                traced_check(value >= low, lambda: f"{name} must be >= {low}")
        if high is not None:
            traced_check(value <= high, lambda: f"{name} must be <= {high}")
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


def check_int(name: str, value, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        kind = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    return value if isinstance(value, torch.SymInt) else int(value)


def _one_of(choices):
    def check(name, value):
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        return value
    return check


def _vocab_size(name, value):
    value = check_int(name, value, allow_none=True)
    if value is not None and is_concrete(value) and value < 1:
        raise ValueError(f"{name} must be in [1, V] (V the number of logit columns), got {value}")
    return value


class _SameAsStudent:
    """The default of the teacher's logit options: the student's value (its repr names it)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self):
        return "SAME_AS_STUDENT"

    def __reduce__(self):  # pickles (modules in a checkpoint) as the one instance
        return (_SameAsStudent, ())


SAME_AS_STUDENT = _SameAsStudent()


def _softcap(name, value):
    """None (no cap) or c > 0."""
    if value is None:
        return None
    return check_number(name, value, low=0.0, low_open=True)


def _teacher(check):
    """A teacher's logit option: SAME_AS_STUDENT (the default) or a value ``check`` takes."""
    def checked(name, value):
        return value if value is SAME_AS_STUDENT else check(name, value)
    return checked


def setting(default, check: Callable, doc: str):
    """A loss setting: a config field with its default, its check and its documentation."""
    return field(default=default, metadata={"check": check, "doc": doc})


# ---------------------------------------------------------------------------------------
# The config.

@dataclass(frozen=True)
class KDConfig:
    """The settings of one loss, validated. Build it with :func:`make_config`.

    ``divergence`` is resolved where beta is a concrete number: ``jsd`` with beta 0 or 1
    becomes ``forward_kl`` / ``reverse_kl`` (TRL's special cases, which the general
    formula does not reduce to); the kernels resolve it again at run time, which covers a
    beta that is symbolic under torch.compile. ``vocab_size`` is None until a call's
    tensors fix it (:meth:`with_vocab_size`).
    """

    divergence: str = setting(
        "forward_kl", _one_of(DIVERGENCES),
        "``forward_kl`` (KL(p||q), default), ``reverse_kl`` (KL(q||p)), ``jsd`` (beta-generalised "
        "Jensen-Shannon, TRL convention) or ``tvd`` (total variation).")
    temperature: float = setting(
        1.0, lambda n, v: check_number(n, v, low=0.0, low_open=True),
        "T > 0, softens both distributions: p = softmax(t/T), q = softmax(s/T).")
    beta: float = setting(
        0.5, lambda n, v: check_number(n, v, low=0.0, high=1.0),
        "JSD mixture weight in [0, 1]: m = beta p + (1 - beta) q; 0 and 1 give forward and reverse KL.")
    alpha: float = setting(
        1.0, lambda n, v: check_number(n, v, low=0.0, high=1.0),
        "weight of the divergence in [0, 1]; 1 - alpha weighs the hard-label cross-entropy "
        "(which needs ``labels``).")
    t_squared: bool = setting(
        True, check_bool, "scale the divergence by T^2 (Hinton et al.), so its gradient keeps its size.")
    ignore_index: int = setting(
        -100, check_int, "label value that drops a token from every term (and from the mean).")
    reduction: str = setting(
        "mean", _one_of(REDUCTIONS),
        "``mean`` over valid tokens (``num_items`` overrides the denominator), ``sum``, ``batchmean`` "
        "(sum / number of tokens) or ``none`` (the per-token loss).")
    vocab_size: Optional[int] = setting(
        None, _vocab_size,
        "only the first ``vocab_size`` columns of each side count (padded vocabularies); the "
        "student's extra columns get zero gradient. None: all columns, and both sides must match.")
    logit_scale: float = setting(
        1.0, lambda n, v: check_number(n, v, low=0.0, low_open=True),
        "m > 0 multiplies the student's logits first (Cohere, muP-style heads): s' = cap(m s).")
    softcap: Optional[float] = setting(
        None, _softcap,
        "None or c > 0: the student's logits become c tanh(m s / c) before the temperature "
        "(Gemma 2's final_logit_softcapping); the gradient carries the factor 1 - tanh^2.")
    teacher_logit_scale: float = setting(
        SAME_AS_STUDENT, _teacher(lambda n, v: check_number(n, v, low=0.0, low_open=True)),
        "the teacher's logit scale; by default the student's ``logit_scale``.")
    teacher_softcap: Optional[float] = setting(
        SAME_AS_STUDENT, _teacher(_softcap),
        "the teacher's softcap; by default the student's ``softcap``; None: no cap on the teacher.")
    label_smoothing: float = setting(
        0.0, lambda n, v: check_number(n, v, low=0.0, high=1.0),
        "epsilon in [0, 1] of the hard-label cross-entropy, PyTorch's convention: the target is "
        "(1 - epsilon) onehot(label) + epsilon / V.")
    z_loss: float = setting(
        0.0, lambda n, v: check_number(n, v, low=0.0),
        "lambda >= 0: adds lambda logsumexp(s')^2 per token (s' the student's transformed logits), "
        "not scaled by 1 - alpha; needs no labels.")
    teacher_mode: str = setting(
        "mixture", _one_of(TEACHER_MODES),
        "how several teachers combine (``teacher_logits`` a sequence of K tensors or one ``[K, ..., V]`` "
        "tensor, weighted by ``teacher_weights``): ``mixture`` (default) D(sum_k w_k p_k || q), the "
        "divergence to the teachers' mixture (for forward KL its gradient is that of sum_k w_k KL(p_k||q)); "
        "``sum``: sum_k w_k D(p_k, q). No effect with one teacher. Several teachers run on the Triton "
        "kernels (up to 4) and the torch backend for now (docs/multi_teacher.md).")
    # Not a setting: the number of classes label smoothing spreads epsilon over, where it
    # differs from vocab_size (a vocab-parallel shard: its own columns, the global classes).
    classes: Optional[int] = field(default=None, repr=False, metadata={"internal": True})

    # Derived values, in the form the kernels use.
    @property
    def inv_temperature(self):
        return 1.0 / self.temperature

    @property
    def div_weight(self):
        """alpha * T^2 (alpha without t_squared): the divergence's weight."""
        return self.alpha * (self.temperature * self.temperature if self.t_squared else 1.0)

    @property
    def ce_weight(self):
        """1 - alpha: the hard-label cross-entropy's weight."""
        return 1.0 - self.alpha

    @property
    def teacher_scale(self):
        """The teacher's logit scale, resolved (SAME_AS_STUDENT is the student's)."""
        return self.logit_scale if self.teacher_logit_scale is SAME_AS_STUDENT else self.teacher_logit_scale

    @property
    def teacher_cap(self):
        """The teacher's softcap, resolved: None or c > 0."""
        return self.softcap if self.teacher_softcap is SAME_AS_STUDENT else self.teacher_softcap

    @property
    def has_hard_label_terms(self) -> bool:
        """Whether a term at T = 1 (the CE term or z-loss) may need the student's softmax."""
        return self.ce_weight != 0.0 or self.z_loss != 0.0

    @property
    def smooth_per_class(self):
        """epsilon / V: the smoothed target's mass on every class, V the classes of the whole
        vocabulary (``classes``, which a vocab-parallel shard sets; else ``vocab_size``)."""
        return self.label_smoothing / (self.classes if self.classes is not None else self.vocab_size)

    @property
    def divergence_id(self) -> int:
        return DIVERGENCES.index(self.divergence)

    @property
    def teacher_mode_id(self) -> int:
        return TEACHER_MODES.index(self.teacher_mode)

    @property
    def softcap_value(self):
        """The student's softcap as kernels read it: c, or 0.0 for none."""
        return 0.0 if self.softcap is None else self.softcap

    @property
    def teacher_softcap_value(self):
        return 0.0 if self.teacher_cap is None else self.teacher_cap

    def with_vocab_size(self, vocab_size: int, classes: Optional[int] = None) -> "KDConfig":
        """This config with ``vocab_size`` fixed; ``classes`` (a vocab-parallel shard's global
        vocabulary) is what label smoothing divides by, where it is not ``vocab_size``."""
        if vocab_size == self.vocab_size and classes == self.classes:
            return self
        # The constructor, not dataclasses.replace: torch.compile (2.4) cannot trace the latter.
        values = {name: getattr(self, name) for name, _, _ in self._SPECS}
        values["vocab_size"] = vocab_size
        values["classes"] = classes
        return type(self)(**values)

    def kernel_settings(self) -> Tuple[List[int], torch.Tensor]:
        """The settings kernels read, as (ints, floats) in INT_SETTINGS (SPARSE_INT_SETTINGS for
        a :class:`SparseKDConfig`) / FLOAT_SETTINGS order: ``ints`` a list, ``floats`` a
        float64 CPU tensor (:func:`pack_floats`)."""
        return self._packed(self._INTS)

    def multi_kernel_settings(self) -> Tuple[List[int], torch.Tensor]:
        """The settings of the several-teachers operators: MULTI_INT_SETTINGS (the dense ints,
        then ``teacher_mode_id``) and the floats of :meth:`kernel_settings`."""
        return self._packed(MULTI_INT_SETTINGS)

    def _packed(self, int_names) -> Tuple[List[int], torch.Tensor]:
        return [getattr(self, n) for n in int_names], pack_floats([getattr(self, n) for n in FLOAT_SETTINGS])

    def changed_settings(self) -> dict:
        """The settings that differ from their defaults (for a module's repr)."""
        return {f.name: getattr(self, f.name) for f in setting_fields(self) if getattr(self, f.name) is not f.default
                and getattr(self, f.name) != f.default}


@dataclass(frozen=True)
class SparseKDConfig(KDConfig):
    """The settings of a sparse-teacher loss (``sparse_kd_loss``): those of :class:`KDConfig`
    and ``tail``, which only a teacher given on a support of K ids has. Build it with
    ``make_config(..., config=SparseKDConfig)``.

    ``tail="none"`` is forward KL only (the check is here, so a module fails at construction).
    """

    tail: str = setting(
        "bucket", _one_of(TAILS),
        "the teacher mass outside its K ids: ``bucket`` (default; one extra bin holding 1 - P for the "
        "teacher and 1 - Q for the student, exact for every divergence), ``renorm`` (both sides "
        "renormalised over the K ids) or ``none`` (sum over the K ids of p (log p - log q), forward KL "
        "only, biased). See docs/sparse.md.")

    @property
    def tail_id(self) -> int:
        return TAILS.index(self.tail)

    # The teacher arrives as log-probabilities at the distillation temperature: its logits'
    # transforms are already applied (make_config refuses setting them).
    @property
    def teacher_scale(self):
        return 1.0

    @property
    def teacher_cap(self):
        return None


# (name, default, check) of every setting of a config class; a plain tuple, which
# torch.compile can trace (it cannot trace dataclasses.fields). Set on the classes after
# their definition, so the dataclass machinery does not take it for a field.
def setting_fields(config) -> list:
    """The fields of a config class (or instance) that are settings: not internal values."""
    return [f for f in fields(config) if "check" in f.metadata]


def _specs(config_class) -> tuple:
    return tuple((f.name, f.default, f.metadata["check"]) for f in setting_fields(config_class))


_SETTINGS = _specs(KDConfig)
SETTING_NAMES = tuple(name for name, _, _ in _SETTINGS)
SPARSE_SETTING_NAMES = tuple(name for name, _, _ in _specs(SparseKDConfig))

# The kernel boundary. csrc/kd_params.h unpacks the same names in the same order. The
# sparse operators take the dense ints followed by the sparse-only ones, the several-teachers
# operators the dense ints followed by the teacher mode.
INT_SETTINGS = ("divergence_id", "ignore_index", "vocab_size")
SPARSE_INT_SETTINGS = INT_SETTINGS + ("tail_id",)
MULTI_INT_SETTINGS = INT_SETTINGS + ("teacher_mode_id",)
FLOAT_SETTINGS = ("inv_temperature", "beta", "div_weight", "ce_weight", "logit_scale", "softcap_value",
                  "teacher_scale", "teacher_softcap_value", "label_smoothing", "smooth_per_class", "z_loss")

KDConfig._SPECS, KDConfig._INTS = _SETTINGS, INT_SETTINGS
SparseKDConfig._SPECS, SparseKDConfig._INTS = _specs(SparseKDConfig), SPARSE_INT_SETTINGS


def pack_floats(values) -> torch.Tensor:
    """The float settings as the operators take them: a float64 tensor in host memory.

    Not a ``float[]``: torch.compile traces a Python float argument as a symbolic value
    (a schedule's temperature, alpha or beta), but an operator's ``float[]`` argument
    needs a number, so the value was specialised and every new one recompiled (the 9th
    failed under ``fullgraph=True``). A tensor argument stays an input of the graph.
    It lives on the host whatever the logits' device: the C++ operators read it on the
    host before launching, the Triton launchers with ``.tolist()`` (no device sync).
    """
    if not torch.compiler.is_compiling():
        # A view of a fresh array (the tensor keeps it alive): a third of torch.tensor's
        # cost, which parses the list element by element.
        return torch.frombuffer(array.array("d", values), dtype=torch.float64)
    # Under compile, torch.tensor / torch.full would read a symbolic value as a Python
    # number (specialising it again); products with a tensor keep it symbolic.
    one = torch.ones((), dtype=torch.float64, device="cpu")
    return torch.stack([one * v for v in values])


def resolve_divergence(divergence: str, beta) -> str:
    if divergence == "jsd" and is_concrete(beta):
        if beta == 0.0:
            return "forward_kl"
        if beta == 1.0:
            return "reverse_kl"
    return divergence


def make_config(caller: str = "make_config", *, config=KDConfig, **settings) -> KDConfig:
    """Validate the loss settings (no tensors needed) and return the frozen config.

    ``caller`` names the public function in the error for an unknown keyword; ``config``
    is the config class (:class:`KDConfig`, or :class:`SparseKDConfig` for the sparse
    losses, which add ``tail``).
    """
    values = {}
    specs = config._SPECS
    for name, default, check in specs:
        values[name] = check(name, settings.pop(name, default))
    if settings:
        name = next(iter(settings))
        raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}; "
                        f"the loss settings are {', '.join(n for n, _, _ in specs)}")
    values["divergence"] = resolve_divergence(values["divergence"], values["beta"])
    if "tail" in values:
        for name in ("teacher_logit_scale", "teacher_softcap"):
            if values[name] is not SAME_AS_STUDENT:
                raise ValueError(f"{name} does not apply to a sparse teacher: its log-probabilities are "
                                 "given after every transform of its logits (scale, softcap, temperature)")
    if values.get("tail") == "none" and values["divergence"] != "forward_kl":
        raise ValueError(f"tail='none' is forward KL only (sum over the K ids of p (log p - log q)); "
                         f"got divergence={values['divergence']!r}: use tail='bucket' or 'renorm'")
    return config(**values)


class KernelSettings:
    """The kernel settings unpacked from (ints, floats) by name, for Python kernels (Triton)."""

    INTS = INT_SETTINGS
    __slots__ = INT_SETTINGS + FLOAT_SETTINGS

    def __init__(self, ints, floats):
        if isinstance(floats, torch.Tensor):  # the operators' form (pack_floats): read on the host
            if floats.device.type != "cpu" or floats.dtype != torch.float64 or floats.dim() != 1:
                raise ValueError(f"fastkd: the float settings must be a 1-D float64 CPU tensor, got "
                                 f"{floats.dim()}-D {floats.dtype} on {floats.device}")
            # Through numpy, which refuses device tensors: this can never be a device sync
            # (and the tests' no-sync guard, which refuses Tensor.tolist, stays meaningful).
            floats = floats.numpy().tolist()
        if len(ints) != len(self.INTS) or len(floats) != len(FLOAT_SETTINGS):
            raise ValueError(f"fastkd: expected {len(self.INTS)} int and {len(FLOAT_SETTINGS)} float settings, "
                             f"got {len(ints)} and {len(floats)}")
        for name, value in zip(self.INTS + FLOAT_SETTINGS, tuple(ints) + tuple(floats)):
            setattr(self, name, value)

    @property
    def divergence(self) -> str:
        return DIVERGENCES[self.divergence_id]


class SparseKernelSettings(KernelSettings):
    """The sparse operators' settings (SPARSE_INT_SETTINGS, FLOAT_SETTINGS) by name."""

    INTS = SPARSE_INT_SETTINGS
    __slots__ = ("tail_id",)

    @property
    def tail(self) -> str:
        return TAILS[self.tail_id]


class MultiKernelSettings(KernelSettings):
    """The several-teachers operators' settings (MULTI_INT_SETTINGS, FLOAT_SETTINGS) by name."""

    INTS = MULTI_INT_SETTINGS
    __slots__ = ("teacher_mode_id",)

    @property
    def teacher_mode(self) -> str:
        return TEACHER_MODES[self.teacher_mode_id]


# ---------------------------------------------------------------------------------------
# Public signatures: the settings as keyword-only parameters, documented once.

def settings_parameters(config=KDConfig, **defaults) -> List[inspect.Parameter]:
    """The settings of ``config`` (a config class) as keyword-only parameters (``defaults``
    overrides a default)."""
    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=defaults.get(f.name, f.default))
            for f in setting_fields(config)]


def settings_doc(indent: str = "        ", config=KDConfig) -> str:
    """The settings' documentation, one entry each, for a public docstring."""
    return "\n".join(f"{indent}{f.name}: {f.metadata['doc']}" for f in setting_fields(config))


def takes_settings(func=None, *, after: Tuple[str, ...] = (), config=KDConfig):
    """Give ``func(..., **settings)`` a signature and docstring that list every setting.

    ``help()``, IDEs and ``inspect.signature`` then show the settings (the fields of
    ``config``: :class:`KDConfig`, or :class:`SparseKDConfig` for the sparse losses) as
    keyword-only parameters; ``{settings}`` in the docstring becomes their documentation.
    The parameters named in ``after`` (call options such as ``backend``) go after them.
    """
    if func is None:
        return lambda f: takes_settings(f, after=after, config=config)
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    head = [p for p in params if p.name not in after]
    tail = [p for p in params if p.name in after]
    taken = {p.name for p in params}
    func.__signature__ = sig.replace(
        parameters=head + [p for p in settings_parameters(config) if p.name not in taken] + tail)
    if func.__doc__ and "{settings}" in func.__doc__:
        func.__doc__ = func.__doc__.replace("{settings}", settings_doc(config=config).lstrip())
    return func
