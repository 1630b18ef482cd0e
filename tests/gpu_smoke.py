#!/usr/bin/env python
"""GPU smoke check of fastkd's kernels: every kernel, on the vocabularies that matter,
against the float64 reference, asserting which kernel actually launched.

    python tests/gpu_smoke.py --out DIR            # the full matrix (step 3 of benchmarks/gpu_check.sh)
    python tests/gpu_smoke.py --out DIR --small    # a few tiny cases, for compute-sanitizer (step 5)

A script, not a pytest file: its name does not match pytest's ``test_*.py``, so a CPU-only
``pytest`` never collects it, and it exits with status 2 when there is no CUDA device
(``--device cpu`` runs the Triton cases under the Triton interpreter, to check the script
itself; kernel names cannot be observed there).

Cases (the full matrix): V in {1001, 20001, 50257, 151936 with a padded student (152064
columns, vocab_size=151936: Qwen's layout), 262144}; bf16 and fp32 logits; forward_kl,
reverse_kl, jsd, tvd; T = 2, alpha = 0.7 (the CE term on labels with ignored tokens);
not in place (reduction='none', backward with random per-row weights: the per-row
scale_grad path) and in place (reduction='mean'); kernels: the CUDA cluster kernel
(FASTKD_CUDA_KERNEL=cluster), the CUDA two-pass kernel (FASTKD_CUDA_KERNEL=twopass),
and the Triton backend.

Each case checks:
  * loss and gradient against fastkd.reference.kd_loss on .double() inputs, under
    the tolerance policy of tests/harness/compare.py (fp32 < 1e-5; bf16 < 1e-2 loss,
    < 2e-2 gradient; fp32 gradients may miss 1e-5 by 2x what PyTorch's own fp32 misses);
  * padded student columns get exactly zero gradient, and the gradient is finite;
  * the kernel that launched, from torch.profiler's CUDA kernel names: kd_cluster_kernel,
    kd_twopass_kernel, or a Triton kernel (a bare name such as kd_forward_kernel). A
    forced cluster kernel must launch the cluster kernel wherever it applies (equal
    dtypes, aligned rows, at most 16 CTAs of 2048 16-byte packs: bf16 V <= 262144, fp32
    V <= 131072); where it does not apply, the call must raise (a forced kernel never
    falls back). The plan op (torch.ops.fastkd.cuda_kernel_plan) and
    torch.ops.fastkd.cuda_last_kernel() must name the kernel that launched.

Output: one line per case, then a summary; DIR/gpu_smoke[_small].json holds every case.
Exit status 0 when every case passed, 1 otherwise, 2 when it could not run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
IMPLS = ("cluster", "twopass", "triton")
FULL_VOCABS = ("1001", "20001", "50257", "151936p", "262144")
SMALL_VOCABS = ("1001", "20001")
PADDED_COLUMNS = {151936: 152064}  # "151936p": Qwen's vocab_size in a 152064-column student
TEMPERATURE, ALPHA, BETA = 2.0, 0.7, 0.5
IGNORE_INDEX = -100

# The cluster kernel's reach (csrc/cuda/kd_cuda.h: 256 threads x 8 packs of 16 bytes per
# CTA, at most 16 CTAs per cluster).
CLUSTER_COLUMNS_PER_CTA_BYTES = 256 * 8 * 16
CLUSTER_MAX_CTAS = 16

CUDA_KERNEL_NAMES = ("kd_cluster_kernel", "kd_twopass_kernel", "row_stats_kernel", "scale_grad_kernel")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring (python -c 'help(...)') or the file's head for the case list.")
    p.add_argument("--out", default=None, help="folder for gpu_smoke[_small].json (default: print only)")
    p.add_argument("--small", action="store_true",
                   help="a few tiny cases (V 1001 and 20001, 4 rows, bf16) for compute-sanitizer; implies --no-profile")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--vocabs", default=None,
                   help="comma-separated V list; '151936p' is 151936 in a padded 152064-column student "
                        f"(default: {','.join(FULL_VOCABS)}; --small: {','.join(SMALL_VOCABS)})")
    p.add_argument("--dtypes", default=None, help="comma-separated subset of bfloat16,float32 "
                                                  "(default: both; --small: bfloat16)")
    p.add_argument("--divergences", default=",".join(DIVERGENCES))
    p.add_argument("--rows", type=int, default=None, help="rows per case (default 32; --small: 4)")
    p.add_argument("--no-profile", action="store_true",
                   help="do not assert the launched kernel (torch.profiler / CUPTI; off under compute-sanitizer)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: Triton cases under TRITON_INTERPRET=1 (checks this script, not the kernels)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.impl_list = _split(args.impls, IMPLS, "--impls")
    args.vocab_list = [_vocab(v) for v in _split(args.vocabs or ",".join(SMALL_VOCABS if args.small else FULL_VOCABS))]
    args.dtype_list = _split(args.dtypes or ("bfloat16" if args.small else "bfloat16,float32"),
                             ("bfloat16", "float32"), "--dtypes")
    args.divergence_list = _split(args.divergences, DIVERGENCES, "--divergences")
    args.n_rows = args.rows or (4 if args.small else 32)
    args.profile = not (args.no_profile or args.small or args.device == "cpu")
    return args


def _split(text: str, allowed=None, flag: str = "") -> List[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if allowed is not None and x not in allowed]
    if bad:
        raise SystemExit(f"{flag}: unknown {bad}; choose from {','.join(allowed)}")
    return items


def _vocab(text: str) -> Tuple[int, int]:
    """(vocab_size, student columns) of a --vocabs entry."""
    padded = text.endswith("p")
    try:
        v = int(text.rstrip("p"))
    except ValueError:
        raise SystemExit(f"--vocabs: {text!r} is not a number (with an optional 'p' for a padded student)")
    return v, (PADDED_COLUMNS.get(v, v + 128) if padded else v)


@dataclass
class Result:
    impl: str
    vocab: int
    student_cols: int
    dtype: str
    divergence: str
    inplace: bool
    ok: bool = False
    loss_err: Optional[float] = None
    grad_err: Optional[float] = None
    loss_tol: Optional[float] = None
    grad_tol: Optional[float] = None
    expected_kernel: Optional[str] = None
    launched: List[str] = field(default_factory=list)
    plan: Optional[str] = None
    problems: List[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def name(self) -> str:
        v = f"{self.vocab}" + (f"(of {self.student_cols})" if self.student_cols != self.vocab else "")
        return f"{self.impl:<7} V={v:<18} {self.dtype:<8} {self.divergence:<10} {'inplace' if self.inplace else 'out':<7}"


# ---------------------------------------------------------------------------------------
# Which kernel ran.

def classify_kernel(name: str) -> Optional[str]:
    """'cluster' / 'twopass' / 'cuda-other' for fastkd's CUDA kernels (demangled C++ names),
    'triton' for a Triton kernel of fastkd (a bare identifier), None for anything else."""
    if "kd_cluster_kernel" in name:
        return "cluster"
    if "kd_twopass_kernel" in name:
        return "twopass"
    bare = re.fullmatch(r"[A-Za-z_]\w*", name) is not None
    if any(k in name for k in CUDA_KERNEL_NAMES) and not bare:
        return "cuda-other"
    if bare and ("kd_" in name or "row_stats" in name or "scale_grad" in name):
        return "triton"
    return None


def cluster_applies(vocab: int, dtype_bytes: int) -> bool:
    """Whether a forced cluster kernel can take these rows (aligned rows, equal dtypes)."""
    per_cta = CLUSTER_COLUMNS_PER_CTA_BYTES // dtype_bytes
    return math.ceil(vocab / per_cta) <= CLUSTER_MAX_CTAS


def expected_kernel(impl: str, vocab: int, dtype_bytes: int) -> str:
    """The kernel that must run; "refused" where a forced cluster kernel cannot take the rows
    (the call must then raise, never fall back to the two-pass kernel)."""
    if impl == "cluster":
        return "cluster" if cluster_applies(vocab, dtype_bytes) else "refused"
    return impl


def last_cuda_kernel() -> Optional[str]:
    """The plan of the last CUDA forward launch, from fastkd (None where the op is missing)."""
    import torch

    op = getattr(getattr(torch.ops, "fastkd", None), "cuda_last_kernel", None)
    return None if op is None else str(op())


def profiled_kernels(fn):
    """Run fn under torch.profiler; (its result, the CUDA kernel names it launched, in order)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    names = []
    for evt in prof.events():
        if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA and evt.name not in names:
            names.append(evt.name)
    return out, names


def check_launched(res: Result, names: List[str]) -> None:
    kinds = [k for k in (classify_kernel(n) for n in names) if k is not None]
    res.launched = sorted(set(kinds))
    want = res.expected_kernel
    if want == "triton":
        if "triton" not in kinds:
            res.problems.append(f"no Triton kernel launched (CUDA kernels seen: {names[:6]})")
        if {"cluster", "twopass", "cuda-other"} & set(kinds):
            res.problems.append(f"backend='triton' launched fastkd CUDA kernels: {sorted(set(kinds))}")
        return
    if want not in kinds:
        res.problems.append(f"expected {want} kernel, launched {sorted(set(kinds)) or 'no fastkd kernel'}")
    other = {"cluster": "twopass", "twopass": "cluster"}[want]
    if other in kinds:
        res.problems.append(f"the {other} kernel launched too (expected only {want})")
    if "triton" in kinds:
        res.problems.append("backend='cuda' launched a Triton kernel")
    if res.plan is not None and not res.plan.startswith(want) and want in kinds:
        res.problems.append(f"plan op says {res.plan}, but {want} launched")


# ---------------------------------------------------------------------------------------
# One case.

class Inputs:
    """Student, teacher, labels and backward weights of one (V, dtype), shared by every
    divergence and kernel; the float64 references are cached per (divergence, inplace)."""

    def __init__(self, vocab: int, student_cols: int, dtype, n: int, device: str, seed: int):
        import torch

        from harness.inputs import logits

        g = torch.Generator(device=device).manual_seed(seed * 1000003 + vocab)
        self.vocab, self.student_cols = vocab, student_cols
        self.student = logits((n, student_cols), dtype, g)
        self.teacher = logits((n, vocab), dtype, g)
        self.labels = torch.randint(0, vocab, (n,), generator=g, device=device)
        self.labels[torch.rand(n, generator=g, device=device) < 0.125] = IGNORE_INDEX
        self.labels[0] = 0  # at least one valid token
        self.row_weights = torch.rand(n, generator=g, device=device, dtype=torch.float32) + 0.5
        self._refs: Dict[Tuple[str, bool], Tuple] = {}

    def kwargs(self, divergence: str, inplace: bool) -> dict:
        return dict(divergence=divergence, temperature=TEMPERATURE, alpha=ALPHA, beta=BETA,
                    ignore_index=IGNORE_INDEX, vocab_size=self.vocab,
                    reduction="mean" if inplace else "none")

    def backward_weight(self, loss):
        return self.row_weights.to(loss.dtype) if loss.dim() else None

    def reference(self, divergence: str, inplace: bool):
        key = (divergence, inplace)
        if key not in self._refs:
            import torch

            from fastkd import reference

            s = self.student.detach().double().requires_grad_(True)
            loss = reference.kd_loss(s, self.teacher.detach().double(), self.labels, **self.kwargs(divergence, inplace))
            loss.backward(self.backward_weight(loss))
            self._refs[key] = (loss.detach(), s.grad.detach())
            del s
            if self.student.is_cuda:
                torch.cuda.synchronize()
        return self._refs[key]

    def fp32_reference_grad_error(self, divergence: str, inplace: bool, ref_grad) -> float:
        """What PyTorch's own fp32 autograd misses on this input (the '2x torch fp32' rule)."""
        from fastkd import reference
        from harness.compare import rel_err

        s = self.student.detach().float().requires_grad_(True)
        loss = reference.kd_loss(s, self.teacher.detach().float(), self.labels, **self.kwargs(divergence, inplace))
        loss.backward(self.backward_weight(loss))
        return rel_err(s.grad.double(), ref_grad)


def run_fastkd(inp: Inputs, impl: str, divergence: str, inplace: bool):
    """fastkd's loss and the gradient w.r.t. the student (float64)."""
    import fastkd

    os.environ["FASTKD_CUDA_KERNEL"] = impl if impl in ("cluster", "twopass") else "auto"
    backend = "triton" if impl == "triton" else "cuda"
    x = inp.student.detach().clone().requires_grad_(True)
    src = x * 1 if inplace else x  # in-place backward writes into a non-leaf's buffer
    loss = fastkd.kd_loss(src, inp.teacher, inp.labels, inplace_backward=inplace, backend=backend,
                          **inp.kwargs(divergence, inplace))
    loss.backward(inp.backward_weight(loss))
    return loss.detach().double(), x.grad.double()


def run_case(inp: Inputs, impl: str, dtype_name: str, divergence: str, inplace: bool, args) -> Result:
    import torch

    from harness.compare import FP32_GRAD_FACTOR, dtype_tolerances, rel_err

    res = Result(impl, inp.vocab, inp.student_cols, dtype_name, divergence, inplace)
    t0 = time.perf_counter()
    try:
        low = dtype_name != "float32"
        res.loss_tol, res.grad_tol = dtype_tolerances(low)
        if impl != "triton" and args.device == "cuda":
            res.expected_kernel = expected_kernel(impl, inp.vocab, inp.student.element_size())
            res.plan = kernel_plan(inp, impl)
        elif impl == "triton":
            res.expected_kernel = "triton"
        ref_loss, ref_grad = inp.reference(divergence, inplace)
        if res.expected_kernel == "refused":
            try:
                run_fastkd(inp, impl, divergence, inplace)
                res.problems.append("a forced cluster kernel that cannot run did not raise")
            except RuntimeError as e:
                if "cluster kernel cannot run" not in str(e):
                    res.problems.append(f"forced cluster raised, but not the refusal: {str(e)[:200]}")
            res.ok = not res.problems
            return res
        if args.profile:
            (loss, grad), names = profiled_kernels(lambda: run_fastkd(inp, impl, divergence, inplace))
            check_launched(res, names)
        else:
            loss, grad = run_fastkd(inp, impl, divergence, inplace)
        if res.expected_kernel in ("cluster", "twopass"):
            last = last_cuda_kernel()
            if last is not None and not last.startswith(res.expected_kernel):
                res.problems.append(f"cuda_last_kernel() says {last}, expected {res.expected_kernel}")
        if not torch.isfinite(grad).all():
            res.problems.append("non-finite gradient")
        if inp.student_cols > inp.vocab and bool((grad[:, inp.vocab:] != 0).any()):
            res.problems.append("padded student columns got a non-zero gradient")
        res.loss_err = rel_err(loss, ref_loss)
        res.grad_err = rel_err(grad, ref_grad)
        if res.grad_err >= res.grad_tol and not low:
            res.grad_tol = max(res.grad_tol,
                               FP32_GRAD_FACTOR * inp.fp32_reference_grad_error(divergence, inplace, ref_grad))
        if not res.loss_err < res.loss_tol:
            res.problems.append(f"loss rel err {res.loss_err:.3g} >= {res.loss_tol:g}")
        if not res.grad_err < res.grad_tol:
            res.problems.append(f"grad rel err {res.grad_err:.3g} >= {res.grad_tol:.3g}")
    except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
        res.problems.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400])
        if os.environ.get("FASTKD_SMOKE_TRACEBACK"):
            traceback.print_exc()
        if "illegal" in str(e).lower() or "unspecified launch failure" in str(e).lower():
            raise  # the CUDA context is gone: nothing after this can run
    finally:
        res.seconds = time.perf_counter() - t0
    res.ok = not res.problems
    return res


def kernel_plan(inp: Inputs, impl: str) -> Optional[str]:
    """What the plan op says a call with this kernel forced would run (None: no plan op)."""
    import torch

    op = getattr(getattr(torch.ops, "fastkd", None), "cuda_kernel_plan", None)
    if op is None:
        return None
    old = os.environ.get("FASTKD_CUDA_KERNEL")
    os.environ["FASTKD_CUDA_KERNEL"] = impl
    try:
        return str(op(inp.student, inp.teacher, False, inp.vocab))
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return f"error: {type(e).__name__}: {e}"[:200]
    finally:
        if old is None:
            os.environ.pop("FASTKD_CUDA_KERNEL", None)
        else:
            os.environ["FASTKD_CUDA_KERNEL"] = old


# ---------------------------------------------------------------------------------------

def environment(args) -> Dict:
    import torch

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "device": args.device,
            "FASTKD_CUDA_KERNEL": os.environ.get("FASTKD_CUDA_KERNEL")}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if args.device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def impl_unavailable(impl: str, args) -> Optional[str]:
    """Why fastkd's backend for `impl` cannot run here, or None."""
    import torch

    import fastkd

    if args.device == "cpu" and impl != "triton":
        return "CUDA kernels need a CUDA device"
    x = torch.zeros(1, 2, device=args.device)
    try:
        fastkd.kd_loss(x, x, backend="triton" if impl == "triton" else "cuda")
    except ValueError as e:
        return str(e).splitlines()[0]
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    sys.path[:0] = [str(HERE), str(HERE.parent)]  # tests/harness, and this checkout's fastkd
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device (torch.cuda.is_available() is False); nothing to check. "
              "--device cpu runs the Triton cases under the interpreter.", file=sys.stderr)
        return 2
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    env = environment(args)
    print("gpu_smoke:", ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    results: List[Result] = []
    skipped: Dict[str, str] = {}
    impls = []
    for impl in args.impl_list:
        if impl == "cluster" and args.device == "cuda" and torch.cuda.get_device_capability() != (9, 0):
            print("gpu_smoke: cluster: not applicable (the cluster kernel is sm_90a code; this device is "
                  f"sm_{env['capability']}); its cases are left out", flush=True)
            continue
        why = impl_unavailable(impl, args)
        if why:
            skipped[impl] = why
            print(f"gpu_smoke: {impl}: cannot run here ({why}); its cases count as failures", flush=True)
        impls.append(impl)
    start = time.perf_counter()
    fatal = None
    try:
        for vocab, cols in args.vocab_list:
            for dtype_name in args.dtype_list:
                inp = Inputs(vocab, cols, dtypes[dtype_name], args.n_rows, args.device, args.seed)
                for divergence in args.divergence_list:
                    for inplace in (False, True):
                        for impl in impls:
                            if impl in skipped:
                                r = Result(impl, vocab, cols, dtype_name, divergence, inplace,
                                           problems=[f"backend unavailable: {skipped[impl]}"])
                            else:
                                r = run_case(inp, impl, dtype_name, divergence, inplace, args)
                            results.append(r)
                            line = f"{'ok  ' if r.ok else 'FAIL'} {r.name}"
                            if r.loss_err is not None:
                                line += f" loss {r.loss_err:.1e} grad {r.grad_err:.1e}"
                            if r.launched:
                                line += f" ran {'+'.join(r.launched)}"
                            if r.problems:
                                line += "  <- " + "; ".join(r.problems)
                            print(line, flush=True)
                del inp
    except Exception as e:  # noqa: BLE001 - a dead CUDA context: report what ran
        fatal = f"{type(e).__name__}: {e}"[:400]
        print(f"gpu_smoke: stopped: {fatal}", flush=True)
    failed = [r for r in results if not r.ok]
    secs = time.perf_counter() - start
    by_impl = {}
    for r in results:
        ok, n = by_impl.get(r.impl, (0, 0))
        by_impl[r.impl] = (ok + r.ok, n + 1)
    summary = ", ".join(f"{impl} {ok}/{n}" for impl, (ok, n) in by_impl.items())
    print(f"gpu_smoke: {len(results) - len(failed)}/{len(results)} cases passed ({summary}) in {secs:.1f} s"
          + (f"; stopped early: {fatal}" if fatal else ""), flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / ("gpu_smoke_small.json" if args.small else "gpu_smoke.json")
        path.write_text(json.dumps({"environment": env, "args": sys.argv[1:] if argv is None else list(argv),
                                    "passed": len(results) - len(failed), "total": len(results),
                                    "fatal": fatal, "seconds": secs, "skipped_impls": skipped,
                                    "cases": [asdict(r) for r in results]}, indent=1))
        print(f"gpu_smoke: wrote {path}")
    return 0 if results and not failed and not fatal else 1


if __name__ == "__main__":
    sys.exit(main())
