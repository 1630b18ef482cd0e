"""What the suite runs on: the backends and the ops. A new backend or op gets the whole
suite by adding one entry here.

A backend names the devices and dtypes it takes; whether it runs here is asked of fastkd
(through harness.backends). An op names its function and Module, its sample cases with
their input maker, its good input and the bad inputs that break it. Tests parametrize
over ``backend_devices()`` / ``backend_names()`` and over ``error_params()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import pytest
import torch

import fastkd

from harness import backends
from harness.cases import ALL_CASES, FUSED_LINEAR_ERRORS, KD_LOSS_ERRORS, LINEAR_CASES, ErrorCase
from harness.inputs import make_inputs, make_linear_inputs, small_kd_inputs, small_linear_inputs

DEVICES = ("cpu", "cuda")
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Backend:
    name: str
    devices: Tuple[str, ...]            # devices whose tensors it may take
    dtypes: Tuple[torch.dtype, ...]     # logits dtypes it computes in
    ops: Tuple[str, ...]                # the ops whose tests it runs
    is_reference: bool = False          # the float64 reference itself: not checked against itself

    def available(self, device) -> bool:
        if device == "cuda" and not torch.cuda.is_available():
            return False
        if self.is_reference:
            return device in self.devices
        return device in self.devices and backends.supports(self.name, device)


@dataclass(frozen=True)
class OpInfo:
    name: str
    function: Callable
    module: type
    cases: Sequence                      # the sample cases every backend is checked on
    make_inputs: Callable                # case -> the tensors of a call
    good_input: Callable[[], dict]       # the arguments of a valid call, broken by error_cases
    error_cases: Sequence[ErrorCase]
    error_backends: Tuple[Optional[str], ...]  # run each per-backend error case with these (None: default)


KD_LOSS = "kd_loss"
FUSED_LINEAR = "fused_linear_kd_loss"

# The order is the order of the tests: cpu, cuda, triton on each device.
BACKENDS = (
    Backend("cpu", ("cpu",), FLOATS + (torch.float64,), (KD_LOSS, FUSED_LINEAR)),
    Backend("cuda", ("cuda",), FLOATS, (KD_LOSS,)),
    Backend("triton", ("cpu", "cuda"), FLOATS, (KD_LOSS,)),  # cpu: under TRITON_INTERPRET=1
    Backend("torch", ("cpu", "cuda"), FLOATS + (torch.float64,), (KD_LOSS, FUSED_LINEAR), is_reference=True),
)
BY_NAME = {b.name: b for b in BACKENDS}


def _kd_good_input() -> dict:
    s, t, labels = small_kd_inputs()
    return dict(student_logits=s, teacher_logits=t, labels=labels)


OPS = {
    KD_LOSS: OpInfo(KD_LOSS, fastkd.kd_loss, fastkd.KDLoss, ALL_CASES, make_inputs, _kd_good_input,
                    KD_LOSS_ERRORS, error_backends=("cpu", "torch")),
    FUSED_LINEAR: OpInfo(FUSED_LINEAR, fastkd.fused_linear_kd_loss, fastkd.FusedLinearKDLoss, LINEAR_CASES,
                         make_linear_inputs, lambda: dict(small_linear_inputs(), alpha=0.6),
                         FUSED_LINEAR_ERRORS, error_backends=(None,)),
}


def backend_devices(op: str = KD_LOSS, devices=DEVICES, with_reference: bool = False):
    """(backend, device) pairs that run ``op`` here, device by device."""
    return [(b.name, d) for d in devices for b in BACKENDS
            if op in b.ops and (with_reference or not b.is_reference) and b.available(d)]


def backend_names(device: str = "cpu", op: str = KD_LOSS, dtype: Optional[torch.dtype] = None,
                  with_reference: bool = False):
    """The backends that run ``op`` on ``device`` here (and compute in ``dtype``)."""
    return [name for name, _ in backend_devices(op, (device,), with_reference)
            if dtype is None or computes_in(name, (dtype,))]


def runs_case(backend: str, case) -> bool:
    """Whether the backend runs this case: computes in its dtypes, and applies its logit
    options (fastkd._dispatch.LOGIT_OPTIONS_BACKENDS; a backend outside it refuses them,
    tested in test_logit_options.py)."""
    from fastkd._dispatch import LOGIT_OPTIONS_BACKENDS
    dtypes = case.dtypes
    return computes_in(backend, dtypes) and (not case.options or backend in LOGIT_OPTIONS_BACKENDS)


def computes_in(backend: str, dtypes) -> bool:
    """Whether the backend computes in every one of these dtypes."""
    return all(dt in BY_NAME[backend].dtypes for dt in dtypes)


def ids(pairs):
    return [f"{b}@{d}" for b, d in pairs]


def case_ids(cases):
    """The cases' ids, repeated ones numbered as pytest numbers them (id_0, id_1, ...)."""
    names = [c.id for c in cases]
    seen = {}
    out = []
    for name in names:
        if names.count(name) > 1:
            seen[name] = seen.get(name, -1) + 1
            name = f"{name}_{seen[name]}"
        out.append(name)
    return out


def error_params(op: str):
    """pytest params (error case, backend) of an op's bad inputs."""
    info = OPS[op]
    return [pytest.param(e, b, id=e.name if b is None else f"{e.name}@{b}")
            for e in info.error_cases for b in (info.error_backends if e.per_backend else (None,))]


def check_error_case(error: ErrorCase, backend: Optional[str]) -> None:
    """The op raises the case's exception, with a message matching its regex."""
    info = OPS[error.op]
    if error.module:
        call, args = info.module, dict(error.change)
    else:
        call, args = info.function, error.arguments(info.good_input())
        if backend is not None:
            args["backend"] = backend
    with pytest.raises(error.exc, match=error.match):
        call(**args)
