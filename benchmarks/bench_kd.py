#!/usr/bin/env python
"""Benchmark of fastkd: forward+backward time, % of the floor, ratios against baselines
timed in the same run, and peak extra memory (docs/measuring.md).

    python benchmarks/bench_kd.py --device cpu --shapes 512x32000 --dtype float32
    python benchmarks/bench_kd.py --device cuda --shapes 8192x128256 --dtype bfloat16 --inplace
    python benchmarks/bench_kd.py --device cuda --op fused_linear --shapes 8192x2048x4096x128256
    python benchmarks/bench_kd.py --device cpu --op fused_linear --shapes 4096x256x384x32000 \\
        --divergences forward_kl --alpha 0.5 --baselines eager --reps 3 --isolate-memory

Every case times `loss = f(...); loss.backward()` on random data (logits ~ N(0, 3^2)) and
reports the median. Results go to OUT/bench_<op>_<device>_<timestamp>.{md,json,png}.
The measuring itself lives in benchmarks/harness/; benchmarks/README.md says what each
column means and how memory is measured.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from harness.baselines import BASELINES, Liger, kd_baselines, linear_baselines
from harness.candidates import KERNEL_BACKENDS, default_backends, kd_candidates, linear_candidates, unavailable_reason
from harness.case import Measurement, run_case
from harness.ceilings import FLOOR_RULES, floor_seconds, measure_ceilings
from harness.inputs import make_inputs
from harness.loss import BETA, LossSpec
from harness.memory import WARMUP_ROWS, first_call_peak, peak_in_fresh_process, report_peak
from harness.plot import plot
from harness.report import command_line, describe_ceilings, device_name, markdown, progress_line, versions, write_json
from harness.timing import timer_name

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPE_FORMS = {"kd": "NxV", "fused_linear": "NxHsxHtxV"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--op", choices=("kd", "fused_linear"), default="kd",
                   help="kd: fastkd.kd_loss on [N, V] logits; fused_linear: fastkd.fused_linear_kd_loss "
                        "on hidden states and LM-head weights")
    p.add_argument("--shapes", default=None,
                   help="comma-separated; kd: NxV (e.g. 512x32000,8192x128256); "
                        "fused_linear: NxHsxHtxV (e.g. 8192x2048x4096x128256)")
    p.add_argument("--divergences", default=None, help=f"comma-separated subset of {','.join(DIVERGENCES)}")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="logits / hidden-state dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=1.0,
                   help="weight of the divergence; < 1 adds (1 - alpha) * CE with random labels to every row")
    p.add_argument("--backends", default=None,
                   help="fastkd backends to time (default: every backend that runs on --device)")
    p.add_argument("--baselines", default=None, help="comma-separated subset of eager,compile,liger "
                                                     "(default: all; 'none' for none)")
    p.add_argument("--inplace", action="store_true", help="also time fastkd with inplace_backward=True")
    p.add_argument("--isolate-memory", action="store_true",
                   help="measure each row's peak memory in a fresh process, on its first full-size call "
                        f"after a warm-up on {WARMUP_ROWS} rows (no heap left over from other rows)")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # the fresh process of --isolate-memory
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per case (cpu default 7; cuda: at least this many, "
                        "and at least 100 ms of runs)")
    p.add_argument("--quick", action="store_true",
                   help="tiny, fast subset (smoke test): small default shape, one divergence, "
                        "eager baseline only, few repetitions; explicit options still win")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    apply_defaults(args)
    return args


def apply_defaults(args: argparse.Namespace) -> None:
    """Fill the options left unset; --quick changes only those."""
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if args.temperature <= 0:
        raise SystemExit(f"--temperature must be > 0, got {args.temperature}")
    if not 0 <= args.alpha <= 1:
        raise SystemExit(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.shapes is None:
        if args.op == "kd":
            args.shapes = "16x1001" if args.quick else ("4096x32000,8192x128256" if cuda else "512x32000")
        else:
            args.shapes = ("16x32x48x1001" if args.quick else
                           ("8192x2048x4096x128256" if cuda else "256x256x512x32000"))
    if args.divergences is None:
        args.divergences = "forward_kl" if args.quick else ",".join(DIVERGENCES)
    if args.baselines is None:
        args.baselines = "eager" if args.quick else ",".join(BASELINES)
    if args.dtype is None:
        args.dtype = "bfloat16" if cuda else "float32"
    if args.reps is None:
        args.reps = 3 if args.quick else (20 if cuda else 7)
    args.reps = max(1, args.reps)
    args.warmup = 1 if args.quick else 2  # untimed calls before the CPU timing loop

    args.shape_list = [parse_shape(s, args.op) for s in args.shapes.split(",") if s.strip()]
    args.divergence_list = split_list(args.divergences, DIVERGENCES, "--divergences")
    args.baseline_list = [] if args.baselines.strip() == "none" else split_list(args.baselines, BASELINES, "--baselines")
    args.backend_list = (default_backends(torch.device(args.device)) if args.backends is None
                         else split_list(args.backends, KERNEL_BACKENDS, "--backends"))


def split_list(text: str, allowed: Sequence[str], flag: str) -> List[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"{flag}: unknown {bad}; choose from {','.join(allowed)}")
    return items


def parse_shape(text: str, op: str) -> tuple:
    want = len(SHAPE_FORMS[op].split("x"))
    try:
        dims = tuple(int(x) for x in text.strip().lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != want or min(dims) <= 0:
        raise SystemExit(f"--shapes: {text!r} is not {SHAPE_FORMS[op]} with positive integers")
    return dims


def impls_of(args: argparse.Namespace, loss: LossSpec, liger: Liger):
    """Every row of one case: the baselines first (eager is what the others are checked against)."""
    if args.op == "kd":
        return kd_baselines(loss, args.baseline_list, liger) + kd_candidates(loss, args.backend_list, args.inplace)
    return linear_baselines(loss, args.baseline_list, liger) + linear_candidates(loss, args.backend_list)


def fresh_process_peak(argv: Optional[Sequence[str]], shape: tuple, divergence: str):
    """impl -> its peak extra bytes, measured by this script in a fresh process (--memory-of)."""
    words = list(sys.argv[1:] if argv is None else argv)
    base = [sys.executable, str(Path(__file__).resolve()), *words,
            "--shapes", "x".join(map(str, shape)), "--divergences", divergence]
    return lambda impl: peak_in_fresh_process(base + ["--memory-of", impl.name])


def measure_one_peak(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """--memory-of IMPL: the fresh process of --isolate-memory (one shape, one divergence)."""
    liger = Liger(device, "liger" in args.baseline_list, with_ce=args.alpha != 1)
    impl = {i.name: i for i in impls_of(args, LossSpec(args.divergence_list[0], args.temperature, args.alpha),
                                        liger)}[args.memory_of]
    inputs = make_inputs(args.op, args.shape_list[0], dtype, device, args.seed)
    report_peak(first_call_peak(impl.build, inputs, device))


def collect_notes(args: argparse.Namespace, device: torch.device, liger: Liger) -> List[str]:
    notes = [liger.note] if liger.note else []
    if args.inplace and args.op == "fused_linear":
        notes.append("--inplace has no meaning for fused_linear (no logits buffer to overwrite); ignored")
    for name in args.backend_list:
        why = unavailable_reason(name, device)
        if why:
            notes.append(f"fastkd[{name}] cannot run on {args.device} here ({why}); its rows will show the error")
    if not args.backend_list:
        notes.append(f"no fastkd kernel backend is available for {args.device}")
    return notes


def memory_method(args: argparse.Namespace, device: torch.device) -> str:
    what = ("torch.cuda.max_memory_allocated above memory_allocated at the start" if device.type == "cuda" else
            "growth of the peak resident set (VmHWM) during one call, fastkd's CPU gradient cache emptied "
            "first; a lower bound for tiny shapes (see benchmarks/README.md)")
    when = (f"in a fresh process per row, first full-size call after a warm-up on {WARMUP_ROWS} rows"
            if args.isolate_memory else "in the benchmark's process, after the row was timed")
    return f"{what}; {when}"


def main(argv: Optional[Sequence[str]] = None) -> Optional[Dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.memory_of:
        measure_one_peak(args, device, dtype)
        return None

    liger = Liger(device, "liger" in args.baseline_list, with_ce=args.alpha != 1)
    notes = collect_notes(args, device, liger)
    for n in notes:
        print("note:", n, flush=True)

    load_start = os.getloadavg()  # CPU timings mean little on a busy machine: record how busy
    print(f"measuring {args.device} ceilings ...", flush=True)
    machine = measure_ceilings(args.op, device, dtype, args.quick)
    print(describe_ceilings(machine, args.dtype), flush=True)

    losses = [LossSpec(d, args.temperature, args.alpha) for d in args.divergence_list]
    total = len(args.shape_list) * sum(len(impls_of(args, loss, liger)) for loss in losses)
    rows: List[Dict] = []
    done = [0]

    def progress(row: Dict) -> None:
        done[0] += 1
        print(progress_line(row, done[0], total), flush=True)

    for shape in args.shape_list:
        for loss in losses:
            how = Measurement(device, args.reps, args.warmup,
                              fresh_process_peak(argv, shape, loss.divergence) if args.isolate_memory else None)
            rows += run_case({"shape": "x".join(map(str, shape)), "divergence": loss.divergence},
                     impls_of(args, loss, liger), make_inputs(args.op, shape, dtype, device, args.seed),
                     floor_seconds(args.op, shape, dtype, machine), how, progress)

    now = _dt.datetime.now()
    meta = {
        "op": args.op, "device": args.device, "device_name": device_name(device),
        "dtype": args.dtype, "temperature": args.temperature, "beta": BETA, "alpha": args.alpha,
        **versions(), "liger": liger.version, "threads": torch.get_num_threads(),
        "date": now.isoformat(timespec="seconds"), "command": command_line(argv),
        "timer": timer_name(device), "reps": args.reps, "machine": machine, "notes": notes,
        "floor_rule": FLOOR_RULES[args.op], "memory": memory_method(args, device),
        "backends": args.backend_list, "baselines": args.baseline_list,
        "loadavg_1min": {"start": load_start[0], "end": os.getloadavg()[0]},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_{args.op}_{args.device}_{now.strftime('%Y%m%d-%H%M%S')}"
    why = plot(rows, meta, stem.with_suffix(".png"))
    if why:
        notes.append(why)
    table = markdown(rows, meta)
    stem.with_suffix(".md").write_text(table)
    write_json(stem.with_suffix(".json"), rows, meta)
    print()
    print(table)
    print(f"wrote {stem}.md, {stem}.json" + ("" if why else f", {stem}.png"))
    return {"meta": meta, "rows": rows, "json": str(stem.with_suffix(".json"))}


if __name__ == "__main__":
    main()
