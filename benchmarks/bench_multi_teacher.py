#!/usr/bin/env python
"""What several teachers cost one backend: forward + backward of ``fastkd.kd_loss`` with one
teacher, and with K teachers mixed, summed and routed (one-hot weights per token), on the
same inputs.

    python benchmarks/bench_multi_teacher.py                        # cpu, 512x32000 fp32, T = 2, K = 2
    python benchmarks/bench_multi_teacher.py --teachers 3 --divergences forward_kl --reps 20 --threads 1

Prints one line per (divergence, teachers) row: the median and the fastest of ``--reps``
timed calls (after two warm-up calls), and the ratio to the one-teacher row of the same
divergence. The issue's target (issue 13) is K teachers mixed at most (K + 2) / 3 times the
one-teacher time on the CPU (the traffic ratio: one more teacher row read per extra
teacher), and routing about 1x (each token reads one teacher). The rows alternate within
each repetition so that a shared machine's slow moments fall on every row alike; on a
shared machine the numbers are rough.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastkd

ROWS = ("one", "mixture", "sum", "routed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cpu")
    p.add_argument("--shape", default="512x32000", help="NxV")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--teachers", type=int, default=2, help="K")
    p.add_argument("--divergences", default="forward_kl,jsd")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {list(ROWS)}")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=1.0, help="< 1 adds the CE term with random labels")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, v = (int(x) for x in args.shape.split("x"))
    k = args.teachers
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(n, v, generator=g) * 3).to(dtype)
    teachers = [(torch.randn(n, v, generator=g) * 3).to(dtype) for _ in range(k)]
    labels = torch.randint(0, v, (n,), generator=g) if args.alpha < 1.0 else None
    uniform = torch.full((k, n), 1.0 / k)
    routed = torch.nn.functional.one_hot(torch.arange(n) % k, k).T.float()
    inputs = {  # (teacher_logits, teacher_weights, teacher_mode)
        "one": (teachers[0], None, "mixture"),
        "mixture": (teachers, uniform, "mixture"),
        "sum": (teachers, uniform, "sum"),
        "routed": (teachers, routed, "mixture"),
    }
    rows = [(d, r) for d in args.divergences.split(",") for r in args.rows.split(",")]
    x = s.clone().requires_grad_(True)

    def call(divergence, row):
        teacher_logits, weights, mode = inputs[row]
        x.grad = None
        loss = fastkd.kd_loss(x, teacher_logits, labels, teacher_weights=weights, teacher_mode=mode,
                              divergence=divergence, temperature=args.temperature, alpha=args.alpha,
                              backend=args.backend)
        loss.backward()

    times = {row: [] for row in rows}
    for row in rows:
        for _ in range(2):
            call(*row)
    for _ in range(args.reps):
        for row in rows:
            start = time.perf_counter()
            call(*row)
            times[row].append(time.perf_counter() - start)
    print(f"# {args.backend}, {n}x{v} {args.dtype}, K={k} (target: mixture <= {(k + 2) / 3:.2f}x one, routed ~1x), "
          f"T={args.temperature}, alpha={args.alpha}, {torch.get_num_threads()} threads, {args.reps} reps; "
          f"fastkd from {fastkd.__file__}")
    print(f"{'divergence':<12} {'teachers':<10} {'median ms':>10} {'min ms':>8} {'x one (median)':>15}")
    for d, r in rows:
        med = statistics.median(times[(d, r)]) * 1e3
        one = statistics.median(times[(d, "one")]) * 1e3 if (d, "one") in times else float("nan")
        print(f"{d:<12} {r:<10} {med:>10.2f} {min(times[(d, r)]) * 1e3:>8.2f} {med / one:>15.3f}")


if __name__ == "__main__":
    main()
