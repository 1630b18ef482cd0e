#!/usr/bin/env python
"""What ``return_stats=True`` costs one backend: forward + backward of ``fastkd.kd_loss``
(and ``fastkd.sparse_kd_loss``) with the per-token diagnostics off and on, on the same inputs.

    python benchmarks/bench_return_stats.py                       # cpu, 512x32000 fp32, T = 2
    python benchmarks/bench_return_stats.py --divergences forward_kl --reps 20 --threads 1
    python benchmarks/bench_return_stats.py --sparse 64 --tails bucket,renorm   # adds sparse rows
    python benchmarks/bench_return_stats.py --threads 1 --cpu-time              # steadier on a busy machine

Prints one line per (loss, divergence, stats) row: the median and the fastest of ``--reps``
timed calls (after two warm-up calls), and the ratio to the stats-off row of the same loss
and divergence (docs/diagnostics.md states the target: within a few percent). The rows
alternate within each repetition so that a shared machine's slow moments fall on every row
alike; on a shared machine the numbers are rough. ``--cpu-time`` (with ``--threads 1``) times
the calling thread's CPU time instead of the wall clock: the time a busy machine takes the
core away is not counted, which steadies the ratios (cache contention still counts).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's fastkd, not an installed one

import fastkd  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cpu")
    p.add_argument("--shape", default="512x32000", help="NxV")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--divergences", default="forward_kl,jsd")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=1.0, help="< 1 adds the CE term with random labels")
    p.add_argument("--sparse", type=int, default=0, help="K > 0 adds sparse_kd_loss rows with a top-K teacher")
    p.add_argument("--tails", default="bucket", help="the sparse rows' tails (with --sparse)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cpu-time", action="store_true", help="time the thread's CPU time (needs --threads 1)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time counts the calling thread only: run it with --threads 1")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    n, v = (int(x) for x in args.shape.split("x"))
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(n, v, generator=g) * 3).to(dtype)
    t = (torch.randn(n, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g) if args.alpha < 1.0 else None
    top = torch.topk(torch.log_softmax(t.float() / args.temperature, -1), args.sparse, -1) if args.sparse else None
    kw = dict(temperature=args.temperature, alpha=args.alpha, backend=args.backend)
    losses = [("dense", d) for d in args.divergences.split(",")]
    if args.sparse:
        losses += [(f"sparse:{tail}", d) for tail in args.tails.split(",") for d in args.divergences.split(",")
                   if tail != "none" or d == "forward_kl"]
    rows = [(loss, d, stats) for loss, d in losses for stats in (False, True)]
    x = s.clone().requires_grad_(True)

    def call(loss_name, divergence, stats):
        x.grad = None
        if loss_name == "dense":
            out = fastkd.kd_loss(x, t, labels, divergence=divergence, return_stats=stats, **kw)
        else:
            out = fastkd.sparse_kd_loss(x, top.indices, top.values, labels, divergence=divergence,
                                        tail=loss_name.split(":")[1], return_stats=stats, **kw)
        (out[0] if stats else out).backward()

    times = {row: [] for row in rows}
    for row in rows:
        for _ in range(2):
            call(*row)
    for _ in range(args.reps):
        for row in rows:
            start = clock()
            call(*row)
            times[row].append(clock() - start)
    print(f"# {args.backend}, {n}x{v} {args.dtype}, T={args.temperature}, alpha={args.alpha}, "
          f"{torch.get_num_threads()} threads, {args.reps} reps, {'CPU' if args.cpu_time else 'wall'} time; fastkd from {fastkd.__file__}")
    print(f"{'loss':<14} {'divergence':<12} {'stats':<6} {'median ms':>10} {'min ms':>8} {'x off (median)':>15}")
    for loss_name, d, stats in rows:
        med = statistics.median(times[(loss_name, d, stats)]) * 1e3
        off = statistics.median(times[(loss_name, d, False)]) * 1e3
        print(f"{loss_name:<14} {d:<12} {'on' if stats else 'off':<6} {med:>10.2f} "
              f"{min(times[(loss_name, d, stats)]) * 1e3:>8.2f} {med / off:>15.3f}")


if __name__ == "__main__":
    main()
