#!/usr/bin/env python
"""What the logit options cost one backend: forward + backward of ``fastkd.kd_loss`` with
the options off, with a softcap, and with every option on, on the same inputs.

    python benchmarks/bench_logit_options.py                      # cpu, 512x32000 fp32, T = 2
    python benchmarks/bench_logit_options.py --options off         # options off only (any build)
    python benchmarks/bench_logit_options.py --divergences forward_kl --reps 20 --threads 1

Prints one line per (divergence, options) row: the median and the fastest of ``--reps``
timed calls (after two warm-up calls), and the ratio to the options-off row of the same
divergence. ``--options off`` runs on a build whose kernels refuse the options (to time the
options-off path before and after a kernel change, run it once per build, alternating).
The rows alternate within each repetition so that a shared machine's slow moments fall on
every row alike; on a shared machine the numbers are rough.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastkd

OPTIONS = {
    "off": {},
    "softcap": dict(softcap=30.0),
    "softcap_ls_z": dict(softcap=30.0, label_smoothing=0.1, z_loss=1e-4),
    "scale": dict(logit_scale=0.5),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cpu")
    p.add_argument("--shape", default="512x32000", help="NxV")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--divergences", default="forward_kl,reverse_kl")
    p.add_argument("--options", default="off,softcap,softcap_ls_z", help=f"comma-separated subset of {list(OPTIONS)}")
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
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(n, v, generator=g) * 3).to(dtype)
    t = (torch.randn(n, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g) if args.alpha < 1.0 else None
    rows = [(d, o) for d in args.divergences.split(",") for o in args.options.split(",")]
    x = s.clone().requires_grad_(True)

    def call(divergence, option):
        x.grad = None
        loss = fastkd.kd_loss(x, t, labels, divergence=divergence, temperature=args.temperature, alpha=args.alpha,
                              backend=args.backend, **OPTIONS[option])
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
    print(f"# {args.backend}, {n}x{v} {args.dtype}, T={args.temperature}, alpha={args.alpha}, "
          f"{torch.get_num_threads()} threads, {args.reps} reps; fastkd from {fastkd.__file__}")
    print(f"{'divergence':<12} {'options':<14} {'median ms':>10} {'min ms':>8} {'x off (median)':>15}")
    for d, o in rows:
        med = statistics.median(times[(d, o)]) * 1e3
        off = statistics.median(times[(d, "off")]) * 1e3 if (d, "off") in times else float("nan")
        print(f"{d:<12} {o:<14} {med:>10.2f} {min(times[(d, o)]) * 1e3:>8.2f} {med / off:>15.3f}")


if __name__ == "__main__":
    main()
