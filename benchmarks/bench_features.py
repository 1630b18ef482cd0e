"""Feature distillation on the CPU: fastkd.feature_loss against plain autograd.

    python benchmarks/bench_features.py [--tokens 8192] [--hidden 4096] [--reps 9] [--threads T] [--compiled]

Forward + backward, fp32. Times are the minimum and median over interleaved repetitions
(the two sides alternate, so a load change on a shared machine hits both); the floor is
reading s and t and writing the gradient once (3 N H 4 bytes) at the copy bandwidth
measured in the same run. Peak extra memory is measured in a fresh process per row
(benchmarks/harness/memory.py: growth of the peak resident set over the inputs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness.memory import peak_extra_bytes  # noqa: E402
from fastkd.features import feature_loss  # noqa: E402


def plain(s, t, kind, normalize):
    if normalize:
        s = torch.nn.functional.layer_norm(s, s.shape[-1:])
        t = torch.nn.functional.layer_norm(t, t.shape[-1:])
    if kind == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean()
    return ((s - t) ** 2).sum(-1).mean()


def ours(s, t, kind, normalize):
    return feature_loss(s, t, kind=kind, normalize=normalize)


IMPLS = {"plain autograd": plain, "fastkd.feature_loss": ours}


def step(fn, s, t, kind, normalize):
    fn(s, t, kind, normalize).backward()
    s.grad = None


def copy_bandwidth(n_bytes: int) -> float:
    """Bytes per second of a large copy, counting read + write."""
    src = torch.empty(n_bytes // 4)
    src.fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def memory_row(args, name, kind, normalize) -> int:
    """Peak extra bytes of one call, in a fresh process."""
    cmd = [sys.executable, __file__, "--memory-row", name, kind, str(int(normalize)),
           "--tokens", str(args.tokens), "--hidden", str(args.hidden)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.compiled:
        cmd.append("--compiled")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def run_memory_row(args, name, kind, normalize) -> None:
    fn = IMPLS[name]
    if args.compiled:
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_()
    t = torch.randn(args.tokens, args.hidden, generator=g)
    if args.compiled:  # compile at the full size before measuring (compilation is not the op)
        step(fn, s, t, kind, normalize)
    else:
        small = s[:8].detach().requires_grad_()
        step(fn, small, t[:8], kind, normalize)
    peak = peak_extra_bytes(lambda: fn(s, t, kind, normalize).backward(), lambda: setattr(s, "grad", None),
                            torch.device("cpu"))
    print(json.dumps({"peak": peak}))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--compiled", action="store_true", help="torch.compile both sides (inductor)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--memory-row", nargs=3, metavar=("IMPL", "KIND", "NORMALIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_row:
        name, kind, normalize = args.memory_row
        run_memory_row(args, name, kind, bool(int(normalize)))
        return

    N, H = args.tokens, args.hidden
    g = torch.Generator().manual_seed(0)
    s = torch.randn(N, H, generator=g).requires_grad_()
    t = torch.randn(N, H, generator=g)
    floor = 3 * N * H * 4 / copy_bandwidth(N * H * 4)
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"N={N}, H={H}, fp32, forward+backward; floor (3 N H 4 bytes at copy bandwidth) {floor * 1e3:.1f} ms"
          + (" ; torch.compile (inductor) on both sides" if args.compiled else ""))
    print(f"{'case':<22}{'implementation':<22}{'min ms':>9}{'median ms':>11}{'% floor':>9}{'peak extra MiB':>16}")
    for kind, normalize in (("mse", False), ("mse", True), ("cosine", False)):
        fns = {name: (torch.compile(fn, fullgraph=True, dynamic=False) if args.compiled else fn)
               for name, fn in IMPLS.items()}
        for fn in fns.values():  # warm-up (and compilation)
            step(fn, s, t, kind, normalize)
        times = {name: [] for name in fns}
        for _ in range(args.reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                step(fn, s, t, kind, normalize)
                times[name].append(time.perf_counter() - t0)
        case = kind + (" + normalize" if normalize else "")
        for name in fns:
            best, med = min(times[name]), statistics.median(times[name])
            peak = memory_row(args, name, kind, normalize)
            print(f"{case:<22}{name:<22}{best * 1e3:>9.1f}{med * 1e3:>11.1f}{100 * floor / best:>8.0f}%"
                  f"{peak / 2**20:>16.0f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
