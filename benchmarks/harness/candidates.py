"""The fastkd rows of a case, and which fastkd backends run here.

Rows name their backend explicitly, never "auto": a row must say which kernel ran.
Only the public API is used: `fastkd.kd_loss(..., backend=...)` also answers whether a
backend runs here (`unavailable_reason`), so the benchmarks do not depend on how fastkd
registers its backends internally.
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch

import fastkd

from .baselines import on_materialised_logits
from .inputs import KDInputs, LinearInputs
from .loss import LossSpec
from .runner import Impl, InplaceRunner, Runner

KERNEL_BACKENDS = ("cpu", "cuda", "triton", "torch")


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """None when fastkd's `backend` runs on `device` tensors here, else fastkd's reason.

    An explicitly requested backend that cannot run is a ValueError saying why
    (docs/backends.md); a two-element call asks. The first call of a backend may load (or JIT-build)
    the extension or import Triton, as the benchmark's first row would.
    """
    x = torch.zeros(1, 2, device=device)
    try:
        fastkd.kd_loss(x, x, backend=backend)
    except ValueError as e:
        return str(e)
    return None


def default_backends(device: torch.device) -> List[str]:
    """fastkd's kernel backends that run on `device`.

    Triton under TRITON_INTERPRET=1 "runs" on CPU tensors, but through a Python
    interpreter: correct and useless as a timing, so it is only timed when asked for.
    """
    names = ("cpu", "cuda") if device.type == "cpu" else ("cpu", "cuda", "triton")
    return [name for name in names if unavailable_reason(name, device) is None]


def kd_candidates(loss: LossSpec, backends: List[str], inplace: bool) -> List[Impl]:
    """fastkd.kd_loss per backend; with `inplace`, also with inplace_backward=True."""
    impls = []
    for name in backends:
        for in_place in ((False, True) if inplace else (False,)):
            impls.append(Impl(f"fastkd[{name}]" + ("+inplace" if in_place else ""), "fastkd",
                              functools.partial(_build_kd, loss, name, in_place)))
    return impls


def _build_kd(loss: LossSpec, backend: str, inplace: bool, x: KDInputs) -> Runner:
    s = x.fresh_student()

    def loss_of(logits):
        return fastkd.kd_loss(logits, x.teacher, loss.labels(x), **loss.kwargs(),
                              inplace_backward=inplace, backend=backend)
    return InplaceRunner(loss_of, s) if inplace else Runner(lambda: loss_of(s), [s])


def linear_candidates(loss: LossSpec, backends: List[str]) -> List[Impl]:
    """Per backend: fastkd.fused_linear_kd_loss (`fastkd[b]`), and fastkd.kd_loss on
    logits materialised by matmuls (`logits+fastkd[b]`: what the fused op saves)."""
    impls = []
    for name in backends:
        impls.append(Impl(f"fastkd[{name}]", "fastkd", functools.partial(_build_fused_linear, loss, name)))
        impls.append(Impl(f"logits+fastkd[{name}]", "fastkd", functools.partial(_build_on_logits, loss, name)))
    return impls


def _build_fused_linear(loss: LossSpec, backend: str, x: LinearInputs) -> Runner:
    sh, sw = x.fresh_student()
    return Runner(lambda: fastkd.fused_linear_kd_loss(sh, sw, x.teacher_hidden, x.teacher_weight, loss.labels(x),
                                                      **loss.kwargs(), backend=backend), [sh, sw])


def _build_on_logits(loss: LossSpec, backend: str, x: LinearInputs) -> Runner:
    sh, sw = x.fresh_student()
    fn = on_materialised_logits(functools.partial(fastkd.kd_loss, backend=backend), loss)
    return Runner(lambda: fn(sh, sw, x.teacher_hidden, x.teacher_weight, loss.labels(x)), [sh, sw])
