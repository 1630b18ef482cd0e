"""The baselines every fastkd row is compared with, timed in the same run on the same inputs.

    eager    kd: the textbook `F.kl_div(F.log_softmax(s/T), F.log_softmax(t/T), log_target=True,
             reduction="batchmean")·T²` for forward KL without CE (inputs upcast to fp32, as KD
             code does), `fastkd.reference.kd_loss` otherwise. fused_linear: both logits
             materialised with matmuls, then `fastkd.reference.kd_loss`.
    compile  `torch.compile` of the same function, compiled before timing (compile_s in the JSON).
    liger    Liger-Kernel when `import liger_kernel` works, on CUDA, for losses without CE.
"""
from __future__ import annotations

import inspect
import time
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from fastkd import reference

from .inputs import KDInputs, LinearInputs
from .loss import LossSpec
from .runner import Impl, Runner

BASELINES = ("eager", "compile", "liger")


def textbook_forward_kl(s, t, temperature):
    """What most KD code does: fp32 log-softmax of both sides, KL, batchmean, times T^2."""
    log_q = F.log_softmax(s.float() / temperature, dim=-1)
    log_p = F.log_softmax(t.float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature ** 2


def eager_kd_fn(loss: LossSpec) -> Callable:
    """loss(s, t, labels) in plain PyTorch."""
    if loss.divergence == "forward_kl" and not loss.uses_labels:
        return lambda s, t, labels: textbook_forward_kl(s, t, loss.temperature)
    return lambda s, t, labels: reference.kd_loss(s, t, labels, **loss.kwargs())


def on_materialised_logits(kd_loss: Callable, loss: LossSpec) -> Callable:
    """loss(sh, sw, th, tw, labels): both [N, V] logits materialised with matmuls, then
    `kd_loss(s, t, labels, **loss.kwargs())` on them."""
    def fn(sh, sw, th, tw, labels):
        s = sh @ sw.t()
        with torch.no_grad():
            t = th @ tw.t()
        return kd_loss(s, t, labels, **loss.kwargs())
    return fn


def eager_linear_fn(loss: LossSpec) -> Callable:
    return on_materialised_logits(reference.kd_loss, loss)


def compiled(fn: Callable) -> Callable:
    # A fresh dynamo cache per case: compiled code is cached on the code object shared by
    # every lambda above, and more recompilations than the limit silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def warm_compiled(runner: Runner) -> Runner:
    """Compile (forward and backward graphs) outside the timed region; record how long it took."""
    t0 = time.perf_counter()
    for _ in range(2):
        runner.clear()
        runner.run()
    runner.compile_s = time.perf_counter() - t0
    runner.clear()
    return runner


def kd_baselines(loss: LossSpec, names: List[str], liger: "Liger") -> List[Impl]:
    def bind(fn: Callable, x: KDInputs) -> Runner:
        s = x.fresh_student()
        return Runner(lambda: fn(s, x.teacher, loss.labels(x)), [s])

    impls = _eager_and_compile(names, eager_kd_fn(loss), bind)
    make = liger.kd_loss_maker(loss) if "liger" in names and liger.available else None
    if make is not None:
        def build_liger(x: KDInputs) -> Runner:
            loss_of = make()  # constructed here, inside the row's error handling
            return bind(lambda s, t, labels: loss_of(s, t), x)
        impls.append(Impl("liger", "baseline", build_liger))
    return impls


def linear_baselines(loss: LossSpec, names: List[str], liger: "Liger") -> List[Impl]:
    def bind(fn: Callable, x: LinearInputs) -> Runner:
        sh, sw = x.fresh_student()
        return Runner(lambda: fn(sh, sw, x.teacher_hidden, x.teacher_weight, loss.labels(x)), [sh, sw])

    impls = _eager_and_compile(names, eager_linear_fn(loss), bind)
    for name, make in liger.fused_linear_makers(loss) if "liger" in names and liger.available else ():
        def build_liger(x: LinearInputs, make=make) -> Runner:
            sh, sw = x.fresh_student()
            return Runner(make(sh, sw, x), [sh, sw])
        impls.append(Impl(name, "baseline", build_liger))
    return impls


def _eager_and_compile(names: List[str], eager_fn: Callable, bind: Callable) -> List[Impl]:
    """The eager and compile rows of `eager_fn`; `bind(fn, inputs)` makes a Runner of fn."""
    impls = []
    if "eager" in names:
        impls.append(Impl("eager", "baseline", lambda x: bind(eager_fn, x)))
    if "compile" in names:
        impls.append(Impl("compile", "baseline", lambda x: warm_compiled(bind(compiled(eager_fn), x))))
    return impls


class Liger:
    """Liger-Kernel baselines, when `import liger_kernel` works and the device is CUDA.

    Liger takes log-probabilities (its kernels do not apply the temperature or T^2), so
    the softmaxes run in eager PyTorch and the result is scaled by T^2 to match fastkd's
    `t_squared=True`; the loss-error columns then check that the conventions line up.
    Losses with a CE term (alpha != 1) have no Liger row.
    """

    def __init__(self, device: torch.device, wanted: bool, with_ce: bool = False):
        self.available, self.note, self.version = False, None, None
        if not wanted:
            return
        try:
            import liger_kernel  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any import failure means "not installed"
            self.note = f"liger: skipped, `import liger_kernel` failed ({type(e).__name__}: {e})"
            return
        self.version = _dist_version("liger-kernel") or _dist_version("liger_kernel")
        if device.type != "cuda":
            self.note = "liger: skipped, its kernels are Triton GPU kernels (needs --device cuda)"
        elif with_ce:
            self.note = "liger: skipped, --alpha != 1 (the Liger rows have no CE term)"
        else:
            self.available = True

    @staticmethod
    def _transformers(name):
        import liger_kernel.transformers as lt
        return getattr(lt, name, None)

    @staticmethod
    def _kd_module(loss: LossSpec):
        """(Liger module, its arguments, what it takes: log-probabilities or probabilities)."""
        return {
            "forward_kl": ("LigerKLDIVLoss", {"reduction": "batchmean", "log_target": True}, "log"),
            # Liger's generalised JSD: beta = 1 is its reverse-KL special case (as in TRL).
            "reverse_kl": ("LigerJSD", {"beta": 1.0}, "log"),
            "jsd": ("LigerJSD", {"beta": loss.beta}, "log"),
            "tvd": ("LigerTVDLoss", {"reduction": "batchmean"}, "prob"),
        }[loss.divergence]

    def kd_loss_maker(self, loss: LossSpec) -> Optional[Callable]:
        """A factory of `loss(s, t)`, or None when this Liger has no such loss.

        The Liger module is constructed by the factory, inside the row's error handling:
        some Liger versions reject arguments (e.g. LigerJSD asserted 0 < beta < 1).
        """
        name, kwargs, takes = self._kd_module(loss)
        cls = self._transformers(name)
        if cls is None:
            return None
        T = loss.temperature

        def make():
            crit = cls(**kwargs)

            def loss_of(s, t):
                ls, lt = F.log_softmax(s.float() / T, dim=-1), F.log_softmax(t.float() / T, dim=-1)
                if takes == "prob":
                    ls, lt = ls.exp(), lt.exp()
                return crit(ls, lt) * T * T
            return loss_of
        return make

    def fused_linear_makers(self, loss: LossSpec):
        """(row name, make(sh, sw, inputs) -> loss fn) for Liger's fused-linear JSD losses."""
        beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": loss.beta}.get(loss.divergence)
        if beta is None:
            return []
        T = loss.temperature
        out = []
        cls = self._transformers("LigerFusedLinearJSD")
        if cls is not None:
            def make(sh, sw, x):
                crit = cls(jsd_beta=beta, temperature=T)
                return lambda: crit(sh, sw, x.teacher_hidden, x.teacher_weight, None) * T * T
            out.append(("liger", make))
        chunked = self._chunked("LigerFusedLinearJSDLoss")
        if chunked is not None and loss.divergence == "jsd":  # its beta sits on the other side: 0.5 only
            def make_chunked(sh, sw, x):
                crit = chunked(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=T)
                # Newer versions take (..., true_labels, student_bias, teacher_bias).
                extra = (None, None) if "student_bias" in inspect.signature(crit.forward).parameters else ()
                return lambda: crit(sh, sw, x.teacher_hidden, x.teacher_weight, x.labels, *extra) * T * T
            out.append(("liger_chunked", make_chunked))
        return out

    @staticmethod
    def _chunked(name):
        try:
            import liger_kernel.chunked_loss as lc
        except ImportError:
            return None
        return getattr(lc, name, None)


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None
