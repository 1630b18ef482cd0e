#!/usr/bin/env python
"""Benchmark of the sparse-teacher loss: fastkd's sparse kernels against the dense kernel on
the same logits shape, and against a PyTorch eager implementation, in one run.

    python benchmarks/bench_sparse.py --device cpu --shape 512x32000 --k 64
    python benchmarks/bench_sparse.py --device cuda --shape 8192x128256 --k 64 --dtype bfloat16

Every row times `loss = f(...); loss.backward()` (forward + backward) on random data
(logits ~ N(0, 3^2), the teacher's top-k of its own random logits) and reports the median
wall time and, on the CPU, the median CPU time of the process (user + system over all
threads: steadier than wall time on a shared machine). `ratio` is the dense `cpu`/GPU
kernel's time over the row's. On CUDA it also reports the two-pass floor: reading the
student logits once and writing their gradient once, 2 N V bytes at the measured
device-to-device copy bandwidth (the sparse teacher's N K ids and log-probs are
negligible).

The GPU rows time whichever backends have sparse kernels (`KernelBackend.has("sparse")`):
as the Triton/CUDA sparse kernels land, they appear here without changes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fastkd  # noqa: E402
from fastkd._dispatch import get_backend  # noqa: E402
from fastkd.sparse import sparse_kd_loss  # noqa: E402
from harness.timing import time_cuda  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default=None, help="NxV (default 512x32000 on cpu, 8192x128256 on cuda)")
    p.add_argument("--k", type=int, default=64, help="teacher ids per token")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--tails", default="bucket,renorm", help="comma-separated sparse tails to time")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-eager", action="store_true", help="skip the PyTorch eager rows (slow at large shapes)")
    return p.parse_args(argv)


def eager_sparse_bucket(s, ids, lp, T):
    """What an unfused implementation writes: log_softmax over the vocabulary, a gather,
    the tail bin from the complement's log-sum-exp (forward KL, mean over tokens)."""
    log_q_all = (s.float() / T).log_softmax(-1)
    log_q = log_q_all.gather(-1, ids)
    log_tail_q = torch.log1p(-log_q.exp().sum(-1).clamp(max=1 - 1e-7))
    lpf = lp.float()
    tail_p = (-torch.expm1(lpf.logsumexp(-1))).clamp_min(0)
    p = lpf.exp()
    kl = (p * (lpf - log_q)).sum(-1) + torch.where(tail_p > 0, tail_p * (tail_p.clamp_min(1e-30).log() - log_tail_q),
                                                   torch.zeros_like(tail_p))
    return kl.mean() * T * T


def cpu_time(run, reps, warmup, leaf):
    for _ in range(warmup):
        leaf.grad = None
        run()
    walls, cpus = [], []
    for _ in range(reps):
        leaf.grad = None
        w0, c0 = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    x = torch.empty(512 * 2 ** 20 // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 4 * 20 / (start.elapsed_time(end) / 1e3)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("float32" if args.device == "cpu" else "bfloat16")]
    N, V = (int(x) for x in (args.shape or ("512x32000" if args.device == "cpu" else "8192x128256")).split("x"))
    K, T = args.k, args.temperature
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(N, V, generator=g) * 3).to(device=device, dtype=dtype)
    t = (torch.randn(N, V, generator=g) * 3).to(device=device, dtype=dtype)
    top = (t.float() / T).log_softmax(-1).topk(K, dim=-1)
    ids, lp = top.indices.contiguous(), top.values.to(dtype).contiguous()
    leaf = s.clone().requires_grad_(True)

    rows = []  # (name, backend, callable)
    kernel_names = ("cpu",) if args.device == "cpu" else ("cuda", "triton")
    for name in kernel_names:
        kernels = get_backend(name)
        if kernels is None or not kernels.supports(device):
            continue
        rows.append((f"dense kd_loss ({name})", True,
                     lambda name=name: fastkd.kd_loss(leaf, t, divergence=args.divergence, temperature=T,
                                                      backend=name)))
        if kernels.has("sparse"):
            for tail in args.tails.split(","):
                rows.append((f"sparse {tail} ({name})", False,
                             lambda name=name, tail=tail: sparse_kd_loss(leaf, ids, lp, divergence=args.divergence,
                                                                         tail=tail, temperature=T, backend=name)))
    if not args.no_eager and args.divergence == "forward_kl":
        rows.append(("sparse bucket (PyTorch eager)", False, lambda: eager_sparse_bucket(leaf, ids, lp, T)))

    print(f"device {args.device}, {N}x{V} {str(dtype).replace('torch.', '')}, K={K}, {args.divergence}, T={T}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = []
    for name, dense, f in rows:
        run = lambda f=f: f().backward()
        if args.device == "cpu":
            wall, cpu = cpu_time(run, args.reps, args.warmup, leaf)
        else:
            wall, cpu = statistics.median(time_cuda(run, [leaf], args.reps)), float("nan")
        results.append((name, dense, wall, cpu))
    dense_wall = next((w for n, d, w, _ in results if d), float("nan"))
    dense_cpu = next((c for n, d, _, c in results if d), float("nan"))
    print(f"| {'implementation':32s} | wall ms | cpu ms | ratio (wall) | ratio (cpu) |")
    print("|" + "-" * 34 + "|---------|--------|--------------|-------------|")
    for name, _, wall, cpu in results:
        print(f"| {name:32s} | {wall * 1e3:7.2f} | {cpu * 1e3:6.1f} | {dense_wall / wall:12.2f} | "
              f"{dense_cpu / cpu:11.2f} |")
    if args.device == "cuda":
        floor = 2 * N * V * s.element_size() / copy_bandwidth(device)
        print(f"two-pass floor (read s, write grad at copy bandwidth): {floor * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
