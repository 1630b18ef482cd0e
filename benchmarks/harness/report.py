"""What a run leaves behind: the description of the machine and the run (`meta`), one
progress line per row, the Markdown table, and the JSON with every raw number."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

import fastkd

MIB = 1024.0 ** 2


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def command_line(argv: Optional[Sequence[str]]) -> str:
    """The command as typed (argv given: the equivalent command of an in-process call)."""
    words = sys.argv if argv is None else [sys.argv[0]] + list(argv)
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + words)


def versions() -> Dict[str, Optional[str]]:
    try:
        import triton
    except ImportError:
        triton = None
    return {"torch": torch.__version__, "triton": getattr(triton, "__version__", None),
            "fastkd": getattr(fastkd, "__version__", None), "python": platform.python_version()}


def fmt_mib(b) -> str:
    return "n/a" if b is None else f"{b / MIB:.1f}"


def fmt_flops(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def fmt(x, spec, none="–") -> str:
    return none if x is None else format(x, spec)


def describe_ceilings(machine: Dict, dtype: str) -> str:
    return (f"copy bandwidth {machine['copy_bandwidth_Bps'] / 1e9:.1f} GB/s (read + write)"
            + (f"; {dtype} matmul {fmt_flops(machine['matmul_flops'])}" if "matmul_flops" in machine else ""))


def progress_line(row: Dict, done: int, total: int) -> str:
    head = f"[{done:>3}/{total}] {row['divergence']:<10} {row['shape']:<22} {row['impl']:<24}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    parts = [f"{row['time_s'] * 1e3:9.3f} ms", f"{row['pct_of_floor']:5.1f}% of floor",
             f"peak +{fmt_mib(row.get('peak_extra_bytes'))} MiB"]
    if "loss_rel_err" in row:
        parts.append(f"loss err {row['loss_rel_err']:.1e} grad err {row['grad_rel_err']:.1e}")
    if "compile_s" in row:
        parts.append(f"(compiled in {row['compile_s']:.1f} s)")
    return head + " " + "  ".join(parts)


def logits_sizes(rows: List[Dict]) -> str:
    """fused_linear: the size of one fp32 [N, V] logits tensor per shape, what peak memory is read against."""
    shapes = dict.fromkeys(r["shape"] for r in rows)
    sizes = []
    for shape in shapes:
        n, *_, v = (int(d) for d in shape.split("x"))
        sizes.append(f"{shape}: {fmt_mib(n * v * 4)} MiB")
    return "one fp32 [N, V] logits tensor: " + ", ".join(sizes)


def markdown(rows: List[Dict], meta: Dict) -> str:
    lines = [
        f"## fastkd benchmark: op `{meta['op']}` on {meta['device_name']} ({meta['device']})",
        "",
        f"- command: `{meta['command']}`",
        f"- {meta['date']}; torch {meta['torch']}, triton {meta['triton'] or 'n/a'}, "
        f"liger {meta['liger'] or 'n/a'}; dtype {meta['dtype']}, T = {meta['temperature']}, beta = {meta['beta']}, "
        f"alpha = {meta['alpha']}; threads {meta['threads']}; 1-min load average "
        f"{meta['loadavg_1min']['start']:.1f} at start, {meta['loadavg_1min']['end']:.1f} at end",
        f"- {describe_ceilings(meta['machine'], meta['dtype'])}",
        f"- floor: {meta['floor_rule']}; time = median of forward + backward",
        f"- peak extra memory: {meta['memory']}",
        "- speedup = baseline time / row time (> 1: faster); errors are relative to the eager row",
    ]
    if meta["op"] == "fused_linear" and rows:
        lines.append(f"- {logits_sizes(rows)}")
    lines += [
        "",
        "| shape | divergence | implementation | time (ms) | % of floor | vs eager | vs compile | vs liger "
        "| peak extra (MiB) | loss rel. err | grad rel. err |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['divergence']} | {r['impl']} | error: {r['error'].replace('|', '/')} "
                         "| | | | | | | |")
            continue
        lines.append(
            f"| {r['shape']} | {r['divergence']} | {r['impl']} | {r['time_s'] * 1e3:.2f} "
            f"| {r['pct_of_floor']:.1f}% | {fmt(r.get('speedup_vs_eager'), '.2f')}× "
            f"| {fmt(r.get('speedup_vs_compile'), '.2f')}× | {fmt(r.get('speedup_vs_liger'), '.2f')}× "
            f"| {fmt_mib(r.get('peak_extra_bytes'))} | {fmt(r.get('loss_rel_err'), '.1e')} "
            f"| {fmt(r.get('grad_rel_err'), '.1e')} |")
    lines = [ln.replace("–×", "–") for ln in lines]
    if meta["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"


def write_json(path: Path, rows: List[Dict], meta: Dict) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
