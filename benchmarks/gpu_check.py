#!/usr/bin/env python
"""One command for a GPU: environment, build, smoke, GPU tests, sanitizers, benchmark, summary.

    bash benchmarks/gpu_check.sh --out DIR                  # every step
    bash benchmarks/gpu_check.sh --out DIR --steps tests,bench   # only these (then the summary)
    bash benchmarks/gpu_check.sh --dry-run                  # print the steps, check the scripts parse (no GPU)

Steps (benchmarks/README.md, "GPU check", says what each runs and how long it may take):

    1 env        nvidia-smi, nvcc and torch CUDA versions, device capability (env.json)
    2 build      fastkd._C for the device's architecture with every core (setup.py build_ext --inplace)
    3 smoke      tests/gpu_smoke.py: kernels x vocabularies x divergences vs float64, launched kernel asserted
    4 tests      the GPU tests, one pytest process per file with -x (a device fault poisons a process)
    5 sanitizer  compute-sanitizer memcheck, racecheck, synccheck, initcheck on gpu_smoke.py --small
    6 bench      benchmarks/bench_kd.py: 8192x{32000,128256,262144} bf16, fused linear, N*V > 2^31;
                 benchmarks/sparse_gpu_check.py: the sparse-teacher kernels vs float64 and the 2NV floor;
                 softcap 30 on vs off, 4096x128256 bf16 forward KL (the logit options' cost);
                 two teachers (0.5/0.5 mixture, routed) vs one, 4096x128256 bf16, cuda and triton
                 vocab-parallel: one shard (V/8 of 128256, a one-rank group) vs dense, per column
    7 summary    DIR/summary.md (also printed): pass/fail per step, % of the copy-bandwidth floor

Every step has a time budget (its commands are killed past it) and a failing step does not
stop the later ones. DIR keeps every log (DIR/logs/), the smoke and benchmark outputs, and
steps.json, which a later call with the same DIR updates: re-run only what failed with
--steps, and the summary covers every step recorded so far. --deadline SECONDS fits the
whole call into a time limit (steps that no longer fit are recorded as skipped), and
--export DIR2 copies summary.md, summary.json and a tarball of DIR into DIR2 (three files:
the device tool brings back at most eight from $OUT).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("env", "build", "smoke", "tests", "sanitizer", "bench", "summary")
DESCRIPTIONS = {
    "env": "nvidia-smi, nvcc and torch CUDA versions, device capability",
    "build": "fastkd._C for the device's architecture, every core",
    "smoke": "tests/gpu_smoke.py: every kernel vs the float64 reference, launched kernel asserted",
    "tests": "GPU tests, one pytest process per file with -x",
    "sanitizer": "compute-sanitizer memcheck/racecheck/synccheck/initcheck on gpu_smoke.py --small",
    "bench": "bench_kd.py: 8192x{32000,128256,262144} bf16 x 4 divergences (cluster, two-pass, Triton, "
             "eager, compile, Liger), fused linear, N*V > 2^31; sparse_gpu_check.py: sparse teachers (K = 64) "
             "vs float64 and the two-pass floor; softcap 30 on vs off (4096x128256 bf16, forward KL); two "
             "teachers (mixture, routed) vs one (4096x128256 bf16, forward KL, cuda and triton); vocab-parallel: one "
             "shard (V/8 = 16032 columns) vs the dense loss per column (4096x128256 bf16, cuda and triton)",
    "summary": "summary.md: pass/fail per step, % of the copy-bandwidth floor per kernel and shape",
}
# Seconds each step may take (its commands are killed past it), and what each is expected
# to take on an H100 with 16 cores: an estimate until the first GPU run replaces it. The
# expected times add up to about 15 minutes; benchmarks/README.md says how they were reckoned.
BUDGETS = {"env": 30, "build": 240, "smoke": 150, "tests": 240, "sanitizer": 180, "bench": 740, "summary": 30}
EXPECTED = {"env": 10, "build": 90, "smoke": 75, "tests": 200, "sanitizer": 120, "bench": 400, "summary": 1}
SUMMARY_RESERVE_S = 20   # kept back under --deadline for the summary and the export
MIN_STEP_S = 20          # under --deadline, a step with less than this left is skipped

BENCH_SHAPES = "8192x32000,8192x128256,8192x262144"
# Llama-3.2-1B student (hidden 2048) distilled from Llama-3.1-8B (hidden 4096), vocabulary
# 128256, 8192 tokens: the shape of the fused-linear issue. Inputs 1.7 GB in bf16; eager
# materialises both logits (2 x 2.1 GB bf16) and the reference's fp32 temporaries (about
# 5 x 4.2 GB): about 25 GB, within an H100's 80 GB.
FUSED_LINEAR_SHAPE = "8192x2048x4096x128256"
# N*V = 2.49e9 > 2^31 = 2.15e9 (Qwen's vocabulary, 16k tokens); 5 GB a bf16 tensor.
BIG_SHAPE = "16384x151936"
SMALL_N_SHAPES = "16x128256,256x128256"  # under 264 rows: the Triton path splits the vocabulary

TEST_FILES = [
    # (file, extra pytest arguments, budget in seconds, why)
    ("tests/test_cuda.py", [], 220, "every test is a GPU test (gpu mark): both CUDA kernels forced"),
    ("tests/test_triton_kernels.py", [], 180, "all of it: on a GPU every test runs on CUDA tensors (DEVICE)"),
    ("tests/test_fused_linear.py", ["-m", "gpu"], 100, "its gpu-marked tests"),
    ("tests/test_correctness.py", ["-k", "cuda"], 120, "the shared case list on cuda@cuda and triton@cuda"),
    ("tests/test_inplace.py", ["-k", "cuda"], 60, "in-place backward on cuda@cuda and triton@cuda"),
    ("tests/test_sparse_gpu.py", [], 150, "sparse teachers: the cuda and triton kernels vs float64 at LLM vocabularies"),
    ("tests/test_sparse_triton.py", [], 90, "the Triton sparse kernel's tests, on CUDA tensors"),
    ("tests/test_cuda_logit_options.py", [], 150, "the logit options on the CUDA kernels: both kernels forced, "
     "sparse teachers, the vocab-parallel shard phases, in place"),
    ("tests/test_cuda_multi_teacher.py", [], 150, "several teachers on the CUDA kernel (kd_multi.cu, never run before "
     "this): every divergence, mode and weights kind, options, K = 1..4, teacher dtypes, in place, V = 128256"),
]
TEST_JOBS = 3          # pytest processes at once (one per file)
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
SANITIZER_BUDGET = 170  # per tool; the four run at once


@dataclass
class Cmd:
    argv: List[str]
    log: str                                   # relative to DIR
    budget: float
    env: Dict[str, str] = field(default_factory=dict)
    label: str = ""

    def shell(self) -> str:
        """The command as a shell line; an inline script (python -c) shows as <script: label>."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        words = [f"<script: {self.label}>" if "\n" in a else shlex.quote(a) for a in self.argv]
        return (env + " " if env else "") + " ".join(words)


@dataclass
class CmdResult:
    label: str
    command: str
    log: str
    rc: Optional[int]
    seconds: float
    timed_out: bool = False


@dataclass
class StepResult:
    step: str
    status: str = "skipped"        # pass, FAIL, skipped
    detail: str = ""
    seconds: float = 0.0
    budget: float = 0.0
    started: str = ""
    commands: List[Dict] = field(default_factory=list)


class Context:
    def __init__(self, out: Path, python: str, dry_run: bool, deadline: Optional[float]):
        self.out = out
        self.python = python
        self.dry_run = dry_run
        self.start = time.monotonic()
        self.deadline = None if not deadline else self.start + deadline
        self.nproc = os.cpu_count() or 1
        self.arch: Optional[str] = None

    def path(self, rel: str) -> Path:
        return self.out / rel

    def left(self) -> Optional[float]:
        """Seconds left for steps under --deadline (None: no deadline)."""
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic() - SUMMARY_RESERVE_S

    def base_env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONUNBUFFERED"] = "1"
        env["FASTKD_NO_JIT"] = "1"         # use the build step's fastkd._C, never a silent JIT build
        env.pop("FASTKD_CUDA_KERNEL", None)  # only the commands that force a kernel set it
        env.pop("TRITON_INTERPRET", None)
        return env


# ---------------------------------------------------------------------------------------
# Running commands: each in its own process group, killed at its budget.

def run_cmd(ctx: Context, cmd: Cmd, limit: float) -> CmdResult:
    log = ctx.path(cmd.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = ctx.base_env()
    env.update(cmd.env)
    t0 = time.monotonic()
    timed_out = False
    with open(log, "w") as f:
        f.write(f"$ {cmd.shell()}\n# budget {limit:.0f} s, started {_dt.datetime.now().isoformat(timespec='seconds')}\n")
        f.flush()
        try:
            proc = subprocess.Popen(cmd.argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            f.write(f"\ncould not start: {e}\n")
            return CmdResult(cmd.label, cmd.shell(), cmd.log, 127, time.monotonic() - t0)
        try:
            rc = proc.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = proc.returncode
        secs = time.monotonic() - t0
        f.write(f"\n# exit status {rc}{' (killed at its budget)' if timed_out else ''} after {secs:.1f} s\n")
    return CmdResult(cmd.label, cmd.shell(), cmd.log, rc, secs, timed_out)


def _kill_group(proc: subprocess.Popen) -> None:
    """End the command this script started, and its children (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def run_cmds(ctx: Context, cmds: List[Cmd], step_end: float, jobs: int = 1) -> List[CmdResult]:
    """Run cmds, `jobs` at a time, each within its budget and the step's end."""
    results: List[Optional[CmdResult]] = [None] * len(cmds)
    lock = threading.Lock()
    queue = list(enumerate(cmds))

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                i, cmd = queue.pop(0)
            limit = min(cmd.budget, step_end - time.monotonic())
            if limit < 5:
                results[i] = CmdResult(cmd.label, cmd.shell(), cmd.log, None, 0.0, True)
                continue
            results[i] = run_cmd(ctx, cmd, limit)
            r = results[i]
            print(f"    {cmd.label or cmd.argv[0]}: exit {r.rc}{' (timeout)' if r.timed_out else ''} "
                  f"in {r.seconds:.0f} s  [{cmd.log}]", flush=True)

    threads = [threading.Thread(target=worker) for _ in range(max(1, min(jobs, len(cmds))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


def tail(ctx: Context, rel: str, n: int = 3000) -> str:
    try:
        return ctx.path(rel).read_text(errors="replace")[-n:]
    except OSError:
        return ""


def failed(results: List[CmdResult]) -> List[CmdResult]:
    return [r for r in results if r.rc != 0]


def describe_rc(r: CmdResult) -> str:
    if r.rc is None and r.timed_out:
        return "not started (no time left)"
    return "timed out" if r.timed_out else f"exit {r.rc}"


# ---------------------------------------------------------------------------------------
# The steps: commands(ctx) lists what a step runs (for --dry-run too); run(ctx, end) runs it.

ENV_PY = r"""
import json, sys
info = {"python": sys.version.split()[0]}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability="%d.%d" % (p.major, p.minor), sm_count=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
except Exception as e:
    info["torch_error"] = repr(e)
for mod in ("triton", "liger_kernel"):
    try:
        m = __import__(mod)
        info[mod] = getattr(m, "__version__", "installed")
    except Exception as e:
        info[mod] = None
if info.get("liger_kernel") == "installed":
    try:
        from importlib.metadata import version
        info["liger_kernel"] = version("liger-kernel")
    except Exception:
        pass
print(json.dumps(info, indent=1))
json.dump(info, open(sys.argv[1], "w"), indent=1)
"""


def env_commands(ctx: Context) -> List[Cmd]:
    return [
        Cmd(["nvidia-smi"], "logs/env_nvidia-smi.log", 20, label="nvidia-smi"),
        Cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,"
             "power.limit,persistence_mode", "--format=csv"], "logs/env_nvidia-smi-query.log", 20,
            label="nvidia-smi --query-gpu"),
        Cmd(["nvcc", "--version"], "logs/env_nvcc.log", 20, label="nvcc --version"),
        Cmd([ctx.python, "-c", ENV_PY, str(ctx.path("env.json"))], "logs/env_torch.log", 60, label="torch/triton"),
        Cmd(["compute-sanitizer", "--version"], "logs/env_compute-sanitizer.log", 20, label="compute-sanitizer"),
        Cmd(["ncu", "--version"], "logs/env_ncu.log", 20, label="ncu"),
    ]


def run_env(ctx: Context, end: float, res: StepResult) -> List[CmdResult]:
    results = run_cmds(ctx, env_commands(ctx), end, jobs=1)
    info = read_json(ctx.path("env.json")) or {}
    nvcc = re.search(r"release (\d+)\.(\d+)", tail(ctx, "logs/env_nvcc.log"))
    info["nvcc"] = f"{nvcc.group(1)}.{nvcc.group(2)}" if nvcc else None
    problems = []
    if not info.get("cuda_available"):
        problems.append("torch sees no CUDA device")
    if info["nvcc"] is None:
        problems.append("nvcc not found")
    elif info.get("torch_cuda") and info["torch_cuda"].split(".")[0] != info["nvcc"].split(".")[0]:
        problems.append(f"torch CUDA {info['torch_cuda']} and nvcc {info['nvcc']} differ in major version")
    for r in results:
        if r.label in ("compute-sanitizer", "ncu") and r.rc != 0:
            info[r.label.replace("-", "_")] = None
    ctx.path("env.json").write_text(json.dumps(info, indent=1))
    res.status = "FAIL" if problems else "pass"
    res.detail = "; ".join(problems) or (
        f"{info.get('device')} (sm {info.get('capability')}, {info.get('sm_count')} SMs, {info.get('memory_gib')} GiB); "
        f"torch {info.get('torch')} CUDA {info.get('torch_cuda')}, nvcc {info.get('nvcc')}, triton {info.get('triton')}, "
        f"liger {info.get('liger_kernel') or 'not installed'}")
    return results


def device_arch(ctx: Context) -> Optional[str]:
    """TORCH_CUDA_ARCH_LIST for the device: '9.0a' on sm_90 (the cluster kernel is sm_90a
    code), 'M.m' elsewhere; None without a device."""
    if ctx.dry_run:
        return "<major.minor of the device; 9.0a on sm_90>"
    if ctx.arch is None:
        try:
            out = subprocess.run([ctx.python, "-c", "import torch; print('%d.%d' % torch.cuda.get_device_capability())"],
                                 capture_output=True, text=True, timeout=60, env=ctx.base_env())
            cap = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            cap = None
        if cap:
            ctx.arch = cap + "a" if cap == "9.0" else cap
    return ctx.arch


BUILD_INPUTS = ("setup.py", "fastkd/backends/cpp_build.py")


def build_stamp(ctx: Context, arch: str) -> str:
    h = hashlib.sha256(arch.encode())
    files = sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_file()) + [ROOT / f for f in BUILD_INPUTS]
    for p in files:
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    try:
        torch_version = subprocess.run([ctx.python, "-c", "import torch; print(torch.__version__)"],
                                       capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        torch_version = "?"
    h.update(torch_version.encode())
    return h.hexdigest()


VERIFY_PY = r"""
import glob, os, subprocess, sys
import fastkd._C as C
import torch
print("fastkd._C:", C.__file__)
plan = getattr(torch.ops.fastkd, "cuda_kernel_plan", None)
print("CUDA operators registered:", plan is not None)
so = C.__file__
try:
    elf = subprocess.run(["cuobjdump", "--list-elf", so], capture_output=True, text=True).stdout
except OSError:
    elf = ""
print(elf)
arch = sys.argv[1].replace(".", "")
want = "sm_" + arch
if plan is None:
    sys.exit("fastkd._C has no CUDA kernels (built without nvcc or FASTKD_BUILD_CUDA=0?)")
if elf and want not in elf:
    sys.exit(f"no {want} code in {so}: the kernels would not run (or run without the cluster kernel)")
if torch.cuda.is_available():
    s = torch.randn(2, 1001, device="cuda", dtype=torch.bfloat16)
    print("plan for [2, 1001] bf16:", plan(s, s, False, 1001))
"""


def build_commands(ctx: Context) -> List[Cmd]:
    arch = device_arch(ctx) or "<no device>"
    return [
        Cmd([ctx.python, "setup.py", "build_ext", "--inplace"], "logs/build.log", BUDGETS["build"],
            env={"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(ctx.nproc), "FASTKD_BUILD_CUDA": "1"},
            label="setup.py build_ext --inplace"),
        Cmd([ctx.python, "-c", VERIFY_PY, arch], "logs/build_verify.log", 60, label="verify fastkd._C"),
    ]


def run_build(ctx: Context, end: float, res: StepResult, force: bool = False) -> List[CmdResult]:
    arch = device_arch(ctx)
    if arch is None:
        res.status, res.detail = "FAIL", "no CUDA device: cannot tell the architecture to build for"
        return []
    build, verify = build_commands(ctx)
    stamp_file = ROOT / "build" / "gpu_check_build.stamp"
    stamp = build_stamp(ctx, arch)
    built = list((ROOT / "fastkd").glob("_C*.so"))
    results = []
    if not force and built and stamp_file.is_file() and stamp_file.read_text().strip() == stamp:
        note = f"up to date for TORCH_CUDA_ARCH_LIST={arch} (same sources, arch and torch: not rebuilt)"
        ctx.path(build.log).parent.mkdir(parents=True, exist_ok=True)
        ctx.path(build.log).write_text(note + "\n")
        print(f"    {note}", flush=True)
    else:
        stamp_file.unlink(missing_ok=True)
        results.append(run_cmd(ctx, build, min(build.budget, end - time.monotonic())))
        print(f"    build: {describe_rc(results[-1])} in {results[-1].seconds:.0f} s  [{build.log}]", flush=True)
    if not failed(results):
        results.append(run_cmd(ctx, verify, min(verify.budget, max(5.0, end - time.monotonic()))))
    bad = failed(results)
    if not bad:
        stamp_file.parent.mkdir(exist_ok=True)
        stamp_file.write_text(stamp + "\n")
        res.status = "pass"
        res.detail = f"TORCH_CUDA_ARCH_LIST={arch}, MAX_JOBS={ctx.nproc}" + (
            f", {results[0].seconds:.0f} s" if len(results) == 2 else ", up to date")
    else:
        res.status = "FAIL"
        lines = [ln for ln in tail(ctx, bad[0].log, 6000).splitlines() if "error" in ln.lower()][:3]
        res.detail = f"{bad[0].label}: {describe_rc(bad[0])}" + (": " + " | ".join(lines) if lines else "")
    return results


def smoke_commands(ctx: Context) -> List[Cmd]:
    return [Cmd([ctx.python, "tests/gpu_smoke.py", "--out", str(ctx.path("smoke"))], "logs/smoke.log",
                BUDGETS["smoke"], label="gpu_smoke.py")]


def run_smoke(ctx: Context, end: float, res: StepResult) -> List[CmdResult]:
    results = run_cmds(ctx, smoke_commands(ctx), end)
    data = read_json(ctx.path("smoke/gpu_smoke.json"))
    ok = not failed(results) and data is not None and data.get("passed") == data.get("total")
    res.status = "pass" if ok else "FAIL"
    if data:
        res.detail = f"{data['passed']}/{data['total']} cases" + (f"; stopped: {data['fatal']}" if data.get("fatal") else "")
        bad = [c for c in data["cases"] if not c["ok"]]
        if bad:
            res.detail += "; first failure: " + _case_name(bad[0]) + ": " + "; ".join(bad[0]["problems"])[:200]
    else:
        res.detail = f"{describe_rc(results[0])}, no gpu_smoke.json" if results else "not run"
    return results


def _case_name(c: Dict) -> str:
    return f"{c['impl']} V={c['vocab']} {c['dtype']} {c['divergence']}{' inplace' if c['inplace'] else ''}"


def tests_commands(ctx: Context) -> List[Cmd]:
    cmds = []
    for path, extra, budget, _ in TEST_FILES:
        name = Path(path).stem
        cmds.append(Cmd([ctx.python, "-m", "pytest", "-x", "-q", "-rfEs", "-p", "no:cacheprovider", path] + extra,
                        f"logs/tests_{name}.log", budget, label=name))
    return cmds


PYTEST_LINE = re.compile(r"^=*\s*(.*\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b.*?)\s*=*$")


def pytest_counts(text: str) -> str:
    for line in reversed(text.splitlines()):
        m = PYTEST_LINE.match(line.strip())
        if m and " in " in m.group(1):
            return m.group(1)
    return ""


def run_tests(ctx: Context, end: float, res: StepResult) -> List[CmdResult]:
    results = run_cmds(ctx, tests_commands(ctx), end, jobs=TEST_JOBS)
    parts = []
    for r in results:
        counts = pytest_counts(tail(ctx, r.log, 4000)) or describe_rc(r)
        parts.append(f"{r.label}: {counts}" + ("" if r.rc == 0 else f" [{describe_rc(r)}]"))
    res.status = "pass" if results and not failed(results) else "FAIL"
    res.detail = "; ".join(parts)
    return results


def sanitizer_commands(ctx: Context) -> List[Cmd]:
    cmds = []
    for tool in SANITIZER_TOOLS:
        # No caching allocator: every tensor its own allocation, so an access past a
        # tensor's end is outside any allocation (memcheck) and fresh memory is really
        # uninitialised (initcheck).
        env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if tool in ("memcheck", "initcheck") else {}
        cmds.append(Cmd(["compute-sanitizer", "--tool", tool, "--print-limit", "20",
                         ctx.python, "tests/gpu_smoke.py", "--small", "--out", str(ctx.path(f"sanitizer/{tool}"))],
                        f"logs/sanitizer_{tool}.log", SANITIZER_BUDGET, env=env, label=tool))
    return cmds


SANITIZER_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) error")


def run_sanitizer(ctx: Context, end: float, res: StepResult) -> List[CmdResult]:
    if shutil.which("compute-sanitizer") is None:
        res.status, res.detail = "FAIL", "compute-sanitizer not found on PATH"
        return []
    results = run_cmds(ctx, sanitizer_commands(ctx), end, jobs=len(SANITIZER_TOOLS))
    parts, ok = [], bool(results)
    for r in results:
        text = tail(ctx, r.log, 200000)
        m = SANITIZER_SUMMARY.findall(text)
        errors = int(m[-1]) if m else None
        smoke = read_json(ctx.path(f"sanitizer/{r.label}/gpu_smoke_small.json"))
        cases = f", smoke {smoke['passed']}/{smoke['total']}" if smoke else ""
        good = r.rc == 0 and errors == 0
        ok &= good
        parts.append(f"{r.label}: " + (f"{errors} errors" if errors is not None else "no error summary")
                     + cases + ("" if good else f" [{describe_rc(r)}]"))
    res.status = "pass" if ok else "FAIL"
    res.detail = "; ".join(parts)
    return results


@dataclass
class BenchRun:
    name: str          # folder under DIR/bench, and the summary's label
    args: List[str]
    kernel: Optional[str]  # FASTKD_CUDA_KERNEL
    budget: float
    why: str


BENCH_RUNS = [
    BenchRun("kd_cluster", ["--shapes", BENCH_SHAPES, "--divergences", "forward_kl,reverse_kl,jsd,tvd",
                            "--backends", "cuda,triton", "--baselines", "eager,compile,liger"], "cluster", 200,
             "CUDA cluster kernel forced, Triton, eager, torch.compile, Liger (when installed)"),
    BenchRun("kd_twopass", ["--shapes", BENCH_SHAPES, "--divergences", "forward_kl,reverse_kl,jsd,tvd",
                            "--backends", "cuda", "--baselines", "eager"], "twopass", 70,
             "CUDA two-pass kernel forced (eager only: the check row)"),
    BenchRun("fused_linear", ["--op", "fused_linear", "--shapes", FUSED_LINEAR_SHAPE, "--divergences",
                              "forward_kl,jsd", "--backends", "cuda,triton", "--baselines", "eager,compile,liger"],
             None, 100, "8192 tokens, Llama-3.2-1B student (2048) from Llama-3.1-8B (4096), V 128256"),
    BenchRun("kd_2p31", ["--shapes", BIG_SHAPE, "--divergences", "forward_kl", "--backends", "cuda,triton",
                         "--baselines", "none"], None, 45, "N*V = 2.49e9 > 2^31, automatic CUDA kernel"),
    BenchRun("kd_small_n", ["--shapes", SMALL_N_SHAPES, "--divergences", "forward_kl,jsd", "--backends",
                            "cuda,triton", "--baselines", "eager"], None, 30,
             "few rows at a large V: the Triton vocabulary split (issue 10 item 7) against the CUDA kernels"),
]


# The sparse-teacher kernels (issue 11): correctness on the first and last rows, and time
# against the two-pass floor, 8192 x {128256, 32000} bf16, K = 64 (its own script: the
# rows and the floor differ from bench_kd.py's). Budget: 2 shapes x 4 modes x (cuda, and
# triton with one program per row and with a grid of 264 programs).
SPARSE_RUN = "sparse"
SPARSE_BUDGET = 110


# The cost of a logit option (issue 13: softcap on within 1.15x of off): forward + backward
# of kd_loss at 4096x128256 bf16, forward KL, T = 2, softcap 30 (Gemma 2's) against none, on
# each CUDA kernel (forced) and Triton, in one process so that on and off share the GPU's
# state. Its own inline script: bench_kd.py has no option flags. A kernel that refuses the
# options (not yet in fastkd._dispatch.LOGIT_OPTIONS_BACKENDS) gives a "skipped" row, not a
# failure; a failing or wrong (loss of the first rows against float64 beyond the bf16 bar)
# CUDA row is an error of kind "fastkd".
SOFTCAP_RUN = "softcap"
SOFTCAP_BUDGET = 60
SOFTCAP_SHAPE = "4096x128256"
SOFTCAP_VALUE = 30.0
SOFTCAP_TARGET = 1.15
SOFTCAP_PY = r'''
import datetime, json, os, statistics, sys, traceback
from pathlib import Path
root, out, shape, cap = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
sys.path[:0] = [str(root), str(root / "benchmarks")]
import torch
import fastkd
from fastkd import reference
from harness.timing import time_cuda
n, v = (int(x) for x in shape.split("x"))
g = torch.Generator(device="cuda").manual_seed(0)
s = (3.0 * torch.randn(n, v, generator=g, device="cuda")).to(torch.bfloat16).requires_grad_(True)
t = (3.0 * torch.randn(n, v, generator=g, device="cuda")).to(torch.bfloat16)
kw = dict(divergence="forward_kl", temperature=2.0)
rows = []
for impl, backend, kernel in (("fastkd[cuda]", "cuda", "cluster"), ("fastkd[cuda]", "cuda", "twopass"),
                              ("fastkd[triton]", "triton", None)):
    if kernel:
        os.environ["FASTKD_CUDA_KERNEL"] = kernel
    else:
        os.environ.pop("FASTKD_CUDA_KERNEL", None)
    base = None
    for softcap in (None, cap):
        row = dict(impl=impl, kernel=kernel or backend, shape=shape, divergence="forward_kl", softcap=softcap,
                   kind="fastkd")
        try:
            run = lambda: fastkd.kd_loss(s, t, softcap=softcap, backend=backend, **kw).backward()
            row["time_s"] = statistics.median(time_cuda(run, [s], 20))
            if backend == "cuda":
                row["launched"] = torch.ops.fastkd.cuda_last_kernel()
            with torch.no_grad():
                got = fastkd.kd_loss(s[:8].detach(), t[:8], softcap=softcap, backend=backend, reduction="none", **kw)
                want = reference.kd_loss(s[:8].detach().double(), t[:8].double(), softcap=softcap, reduction="none",
                                         **kw)
            row["loss_err"] = ((got.double() - want).norm() / want.norm()).item()
            if not row["loss_err"] < 1e-2:
                row["error"] = "loss of the first rows off the float64 reference by %.2g" % row["loss_err"]
            if softcap is None:
                base = row["time_s"]
            elif base:
                row["ratio_vs_off"] = row["time_s"] / base
        except NotImplementedError as e:
            row.update(kind="skipped", note=str(e)[:120])
        except Exception as e:
            row["error"] = "%s: %s" % (type(e).__name__, str(e)[:200])
            traceback.print_exc()
        print(json.dumps(row), flush=True)
        rows.append(row)
out.mkdir(parents=True, exist_ok=True)
meta = dict(device_name=torch.cuda.get_device_name(), date=datetime.datetime.now().isoformat(timespec="seconds"),
            dtype="bfloat16", temperature=2.0, softcap=cap, machine={})
(out / "bench_softcap.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
'''


# Several teachers (issue 13, item 4): forward + backward of kd_loss at 4096x128256 bf16,
# forward KL, T = 2: one teacher, two as a 0.5/0.5 mixture, and two routed one-hot per token
# (each token reads one teacher), on the cuda and triton backends, in one process. A backend
# with a several-teachers kernel is measured even before it joins
# fastkd._dispatch.MULTI_TEACHER_BACKENDS; one without gives "skipped" rows, not a failure; a failing or wrong (loss of the first rows against float64
# beyond the bf16 bar) row is an error of kind "fastkd". The bound, (K + 2) / 3 of the
# one-teacher time for K = 2 (the traffic ratio), is stated for the CPU; on a GPU the table
# shows the ratio (the one-teacher cuda call may run the single-read cluster kernel, the
# several-teachers kernel is two-pass).
MULTI_RUN = "multi"
MULTI_BUDGET = 60
MULTI_SHAPE = "4096x128256"
MULTI_PY = r'''
import datetime, json, statistics, sys, traceback
from pathlib import Path
root, out, shape = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
sys.path[:0] = [str(root), str(root / "benchmarks")]
import torch
import fastkd
from fastkd import _dispatch, reference
from harness.timing import time_cuda
# A backend whose several-teachers kernel exists is measured whether or not it has joined the
# dispatch gate yet (as tests/test_cuda_multi_teacher.py tests it).
for name in ("cuda", "triton"):
    kernels = _dispatch.get_backend(name)
    if kernels is not None and kernels.multi_forward is not None:
        _dispatch.MULTI_TEACHER_BACKENDS = _dispatch.MULTI_TEACHER_BACKENDS | {name}
n, v = (int(x) for x in shape.split("x"))
g = torch.Generator(device="cuda").manual_seed(0)
s = (3.0 * torch.randn(n, v, generator=g, device="cuda")).to(torch.bfloat16).requires_grad_(True)
t0 = (3.0 * torch.randn(n, v, generator=g, device="cuda")).to(torch.bfloat16)
t1 = (3.0 * torch.randn(n, v, generator=g, device="cuda")).to(torch.bfloat16)
route = torch.nn.functional.one_hot(torch.arange(n, device="cuda") % 2, 2).T.float()
setups = (("1", t0, None), ("2, mixture", [t0, t1], [0.5, 0.5]), ("2, routed", [t0, t1], route))
kw = dict(divergence="forward_kl", temperature=2.0)
rows = []
for impl, backend in (("fastkd[cuda]", "cuda"), ("fastkd[triton]", "triton")):
    base = None
    for label, t, w in setups:
        row = dict(impl=impl, kernel=backend, shape=shape, divergence="forward_kl", teachers=label, kind="fastkd")
        try:
            run = lambda: fastkd.kd_loss(s, t, teacher_weights=w, backend=backend, **kw).backward()
            row["time_s"] = statistics.median(time_cuda(run, [s], 20))
            if backend == "cuda":
                row["launched"] = torch.ops.fastkd.cuda_last_kernel()
            t8 = t[:8] if isinstance(t, torch.Tensor) else [x[:8] for x in t]
            w8 = w[:, :8] if isinstance(w, torch.Tensor) else w
            with torch.no_grad():
                got = fastkd.kd_loss(s[:8].detach(), t8, teacher_weights=w8, backend=backend, reduction="none", **kw)
                t64 = t8.double() if isinstance(t8, torch.Tensor) else [x.double() for x in t8]
                want = reference.kd_loss(s[:8].detach().double(), t64, teacher_weights=w8, reduction="none", **kw)
            row["loss_err"] = ((got.double() - want).norm() / want.norm()).item()
            if not row["loss_err"] < 1e-2:
                row["error"] = "loss of the first rows off the float64 reference by %.2g" % row["loss_err"]
            if base is None:
                base = row["time_s"]
            else:
                row["ratio_vs_one"] = row["time_s"] / base
        except NotImplementedError as e:
            row.update(kind="skipped", note=str(e)[:120])
        except Exception as e:
            row["error"] = "%s: %s" % (type(e).__name__, str(e)[:200])
            traceback.print_exc()
        print(json.dumps(row), flush=True)
        rows.append(row)
out.mkdir(parents=True, exist_ok=True)
meta = dict(device_name=torch.cuda.get_device_name(), date=datetime.datetime.now().isoformat(timespec="seconds"),
            dtype="bfloat16", temperature=2.0, machine={})
(out / "bench_multi.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
'''


# Issue 12's GPU bound: one GPU can show only the per-shard kernel. The vocab-parallel loss on a
# one-rank group (its collectives then move nothing) over the first V/8 columns, against the
# dense kd_loss over all V, per column: the bound is within 10% (ratio <= 1.10). Forward KL
# (two phases) and JSD (three), cuda and triton backends, bf16, T = 2, forward + backward;
# the shard's loss over its first rows against float64. Its device argument exists so that
# tests/test_gpu_check.py can run it on the CPU (fp32, the cpu backend).
SHARD_RUN = "shard"
SHARD_BUDGET = 60
SHARD_SHAPE = "4096x128256"
SHARD_SPLIT = 8
SHARD_TARGET = 1.10
SHARD_PY = r'''
import datetime, json, os, sys, statistics, tempfile, traceback
from pathlib import Path
root, out, shape, split = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
device = sys.argv[5] if len(sys.argv) > 5 else "cuda"
sys.path[:0] = [str(root), str(root / "benchmarks")]
import torch
import torch.distributed as dist
import fastkd
from fastkd import reference
from fastkd.distributed import vocab_parallel_kd_loss
from harness.timing import time_call
dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1,
                        init_method="file://" + os.path.join(tempfile.mkdtemp(), "store"))
n, v = (int(x) for x in shape.split("x"))
width = v // split
dtype = torch.bfloat16 if device == "cuda" else torch.float32
g = torch.Generator(device=device).manual_seed(0)
s = (3.0 * torch.randn(n, v, generator=g, device=device)).to(dtype).requires_grad_(True)
t = (3.0 * torch.randn(n, v, generator=g, device=device)).to(dtype)
s_shard = s.detach()[:, :width].contiguous().requires_grad_(True)
t_shard = t[:, :width].contiguous()
dev = torch.device(device)
rows = []
for backend in (("cuda", "triton") if device == "cuda" else ("cpu",)):
    for div in ("forward_kl", "jsd"):
        kw = dict(divergence=div, temperature=2.0, backend=backend)
        row = dict(impl=f"fastkd[{backend}]", kernel=backend, shape=shape, width=width, divergence=div, kind="fastkd")
        try:
            dense = lambda: fastkd.kd_loss(s, t, **kw).backward()
            shard = lambda: vocab_parallel_kd_loss(s_shard, t_shard, vocab_start=0, **kw).backward()
            for name, run, leaf in (("dense", dense, s), ("shard", shard, s_shard)):
                clear = lambda leaf=leaf: setattr(leaf, "grad", None)
                row[name + "_time_s"] = statistics.median(time_call(run, clear, [leaf], dev, 20, 2))
            row["per_column_ratio"] = (row["shard_time_s"] / width) / (row["dense_time_s"] / v)
            k = min(n, 64)
            with torch.no_grad():
                got = vocab_parallel_kd_loss(s_shard[:k].detach(), t_shard[:k], vocab_start=0, **kw)
                want = reference.kd_loss(s_shard[:k].detach().double(), t_shard[:k].double(), divergence=div,
                                         temperature=2.0)
            row["loss_err"] = abs(got.double().item() - want.item()) / abs(want.item())
            if not row["loss_err"] < 1e-2:
                row["error"] = "the shard's loss is off the float64 reference by %.2g" % row["loss_err"]
        except NotImplementedError as e:
            row.update(kind="skipped", note=str(e)[:120])
        except Exception as e:
            row["error"] = "%s: %s" % (type(e).__name__, str(e)[:200])
            traceback.print_exc()
        print(json.dumps(row), flush=True)
        rows.append(row)
dist.destroy_process_group()
out.mkdir(parents=True, exist_ok=True)
meta = dict(device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu",
            date=datetime.datetime.now().isoformat(timespec="seconds"), dtype=str(dtype).split(".")[-1],
            temperature=2.0, split=split, machine={})
(out / "bench_shard.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
'''

def bench_commands(ctx: Context) -> List[Cmd]:
    cmds = []
    for run in BENCH_RUNS:
        env = {"FASTKD_CUDA_KERNEL": run.kernel} if run.kernel else {}
        cmds.append(Cmd([ctx.python, "benchmarks/bench_kd.py", "--device", "cuda", "--dtype", "bfloat16", *run.args,
                         "--out", str(ctx.path(f"bench/{run.name}"))], f"logs/bench_{run.name}.log", run.budget,
                        env=env, label=run.name))
    cmds.append(Cmd([ctx.python, "benchmarks/sparse_gpu_check.py", "--out", str(ctx.path(f"bench/{SPARSE_RUN}"))],
                    f"logs/bench_{SPARSE_RUN}.log", SPARSE_BUDGET, label=SPARSE_RUN))
    cmds.append(Cmd([ctx.python, "-c", SOFTCAP_PY, str(ROOT), str(ctx.path(f"bench/{SOFTCAP_RUN}")), SOFTCAP_SHAPE,
                     str(SOFTCAP_VALUE)], f"logs/bench_{SOFTCAP_RUN}.log", SOFTCAP_BUDGET, label=SOFTCAP_RUN))
    cmds.append(Cmd([ctx.python, "-c", MULTI_PY, str(ROOT), str(ctx.path(f"bench/{MULTI_RUN}")), MULTI_SHAPE],
                    f"logs/bench_{MULTI_RUN}.log", MULTI_BUDGET, label=MULTI_RUN))
    cmds.append(Cmd([ctx.python, "-c", SHARD_PY, str(ROOT), str(ctx.path(f"bench/{SHARD_RUN}")), SHARD_SHAPE,
                     str(SHARD_SPLIT)], f"logs/bench_{SHARD_RUN}.log", SHARD_BUDGET, label=SHARD_RUN))
    return cmds


def run_bench(ctx: Context, end: float, res: StepResult) -> List[CmdResult]:
    for name in [run.name for run in BENCH_RUNS] + [SPARSE_RUN, SOFTCAP_RUN, MULTI_RUN, SHARD_RUN]:  # a re-run replaces the old results
        shutil.rmtree(ctx.path(f"bench/{name}"), ignore_errors=True)
    results = run_cmds(ctx, bench_commands(ctx), end, jobs=1)  # one at a time: they are timings
    parts, ok = [], bool(results)
    for r in results:
        data = bench_json(ctx, r.label)
        if data is None:
            ok = False
            parts.append(f"{r.label}: {describe_rc(r)}, no JSON")
            continue
        rows = data["rows"]
        errs = [x for x in rows if "error" in x]
        fastkd_errs = [x for x in errs if x.get("kind") == "fastkd"]
        ok &= r.rc == 0 and not fastkd_errs
        parts.append(f"{r.label}: {len(rows) - len(errs)}/{len(rows)} rows" +
                     (f" ({len(fastkd_errs)} fastkd rows failed: {fastkd_errs[0]['impl']}: {fastkd_errs[0]['error'][:80]})"
                      if fastkd_errs else "") +
                     (f" ({len(errs) - len(fastkd_errs)} baseline rows failed)" if len(errs) > len(fastkd_errs) else ""))
    res.status = "pass" if ok else "FAIL"
    res.detail = "; ".join(parts)
    return results


def bench_json(ctx: Context, name: str) -> Optional[Dict]:
    files = sorted(ctx.path(f"bench/{name}").glob("bench_*.json"))
    return read_json(files[-1]) if files else None


def read_json(path: Path) -> Optional[Dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------
# Summary.

# §3 of issue 10: the targets on an H100, at 8192x128256 bf16.
TARGETS = [("cuda (cluster)", "forward_kl", 90.0), ("cuda (cluster)", "reverse_kl", 85.0),
           ("cuda (cluster)", "tvd", 85.0), ("cuda (cluster)", "jsd", 75.0)]
TRITON_TARGET = 60.0
COMPILE_SPEEDUP_TARGET = 4.0
TARGET_SHAPE = "8192x128256"


def kernel_label(run: str, impl: str) -> Optional[str]:
    """The summary's name of a bench row, or None for rows it leaves out (duplicates)."""
    if impl == "fastkd[cuda]":
        return {"kd_cluster": "cuda (cluster)", "kd_twopass": "cuda (two-pass)"}.get(run, "cuda (auto)")
    if run == "kd_twopass":
        return None  # its eager row repeats kd_cluster's
    if impl == "fastkd[triton]":
        return "triton"
    return impl


def floor_tables(ctx: Context) -> List[str]:
    lines: List[str] = []
    kd_rows = []
    how = ""
    for run in ("kd_cluster", "kd_twopass", "kd_2p31"):
        data = bench_json(ctx, run)
        if data:
            how = how or f"{data['meta'].get('dtype')}, T = {data['meta'].get('temperature')}"
            for r in data["rows"]:
                label = kernel_label(run, r["impl"])
                if label:
                    kd_rows.append((label, r))
            bw = data["meta"]["machine"].get("copy_bandwidth_Bps")
            if bw:
                lines.append(f"- `{run}`: copy bandwidth {bw / 1e12:.2f} TB/s (read + write), "
                             f"{data['meta'].get('device_name')}, {data['meta'].get('date')}")
    if kd_rows:
        shapes = list(dict.fromkeys(r["shape"] for _, r in kd_rows))
        lines += ["", "% of the copy-bandwidth floor (3·N·V·bytes at the measured copy bandwidth) and time, "
                      f"median forward + backward, {how}:", "",
                  "| kernel | divergence | " + " | ".join(shapes) + " |",
                  "|---|---|" + "---:|" * len(shapes)]
        kernels = list(dict.fromkeys(label for label, _ in kd_rows))
        divs = list(dict.fromkeys(r["divergence"] for _, r in kd_rows))
        keys = sorted(dict.fromkeys((label, r["divergence"]) for label, r in kd_rows),
                      key=lambda k: (kernels.index(k[0]), divs.index(k[1])))
        for label, div in keys:
            cells = []
            for shape in shapes:
                hit = [r for lab, r in kd_rows if lab == label and r["divergence"] == div and r["shape"] == shape]
                cells.append(_cell(hit[0]) if hit else "")
            lines.append(f"| {label} | {div} | " + " | ".join(cells) + " |")
    data = bench_json(ctx, "fused_linear")
    if data:
        lines += ["", "Fused linear (`--op fused_linear`, N×Hs×Ht×V), % of the matmul floor "
                      f"({data['meta']['machine'].get('matmul_flops', 0) / 1e12:.1f} TFLOP/s measured):", "",
                  "| shape | implementation | divergence | time (ms) | % of floor | vs eager | vs compile | peak extra (MiB) |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in data["rows"]:
            if "error" in r:
                lines.append(f"| {r['shape']} | {r['impl']} | {r['divergence']} "
                             f"| error: {r['error'][:60].replace('|', '/')} | | | | |")
            else:
                lines.append(f"| {r['shape']} | {r['impl']} | {r['divergence']} | {r['time_s'] * 1e3:.2f} "
                             f"| {r['pct_of_floor']:.1f}% "
                             f"| {_x(r.get('speedup_vs_eager'))} | {_x(r.get('speedup_vs_compile'))} "
                             f"| {_mib(r.get('peak_extra_bytes'))} |")
    lines += target_table(kd_rows)
    lines += sparse_table(ctx)
    lines += softcap_table(ctx)
    lines += multi_table(ctx)
    lines += shard_table(ctx)
    return lines


def softcap_table(ctx: Context) -> List[str]:
    """The softcap rows (SOFTCAP_PY): time with the option off and on, and their ratio."""
    data = bench_json(ctx, SOFTCAP_RUN)
    if not data:
        return []
    meta = data["meta"]
    lines = ["", f"Softcap cost ({SOFTCAP_SHAPE} {meta.get('dtype')}, forward KL, T = {meta.get('temperature')}, "
                 f"softcap {meta.get('softcap')} against none), median forward + backward (issue 13: on within "
                 f"{SOFTCAP_TARGET}× of off):", "",
             "| implementation | kernel | off (ms) | on (ms) | on / off | met | note |", "|---|---|---:|---:|---:|---|---|"]
    pairs: Dict = {}
    for r in data["rows"]:
        pairs.setdefault((r["impl"], r["kernel"]), {})["on" if r.get("softcap") else "off"] = r
    for (impl, kernel), pair in pairs.items():
        off, on = pair.get("off", {}), pair.get("on", {})
        ratio = on.get("ratio_vs_off")
        note = " ".join(x.get("error") or x.get("note") or "" for x in (off, on)).strip().replace("|", "/")[:80]
        lines.append(f"| {impl} | {kernel} | {_ms(off.get('time_s'))} | {_ms(on.get('time_s'))} "
                     f"| {'–' if ratio is None else format(ratio, '.2f') + '×'} "
                     f"| {'–' if ratio is None else ('yes' if ratio <= SOFTCAP_TARGET else 'no')} | {note} |")
    return lines


def multi_table(ctx: Context) -> List[str]:
    """The several-teachers rows (MULTI_PY): one teacher, two as a mixture, two routed, and
    each against one teacher."""
    data = bench_json(ctx, MULTI_RUN)
    if not data:
        return []
    meta = data["meta"]
    lines = ["", f"Several teachers ({MULTI_SHAPE} {meta.get('dtype')}, forward KL, T = {meta.get('temperature')}), "
                 "median forward + backward, against one teacher (issue 13's (K + 2)/3 = 1.33 for K = 2 is a CPU "
                 "bound):", "",
             "| implementation | teachers | time (ms) | vs one | kernel | note |", "|---|---|---:|---:|---|---|"]
    for r in data["rows"]:
        ratio = r.get("ratio_vs_one")
        note = (r.get("error") or r.get("note") or "").replace("|", "/")[:80]
        lines.append(f"| {r['impl']} | {r.get('teachers')} | {_ms(r.get('time_s'))} "
                     f"| {'–' if ratio is None else format(ratio, '.2f') + '×'} | {r.get('launched', '–')} | {note} |")
    return lines


def shard_table(ctx: Context) -> List[str]:
    """The vocab-parallel per-shard rows (SHARD_PY): the dense loss over V and the shard's over
    V / split, and the shard's time per column against the dense one's."""
    data = bench_json(ctx, SHARD_RUN)
    if not data:
        return []
    meta = data["meta"]
    lines = ["", f"Vocab-parallel, one shard ({SHARD_SHAPE} {meta.get('dtype')}, the first V/{meta.get('split')} "
                 f"columns on a one-rank group, T = {meta.get('temperature')}), median forward + backward; issue 12: "
                 f"the shard's time per column within {SHARD_TARGET:.2f}× of the dense kernel's:", "",
             "| implementation | divergence | dense (ms) | shard (ms) | per column vs dense | within | note |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in data["rows"]:
        ratio = r.get("per_column_ratio")
        note = (r.get("error") or r.get("note") or "").replace("|", "/")[:80]
        lines.append(f"| {r['impl']} | {r['divergence']} | {_ms(r.get('dense_time_s'))} | {_ms(r.get('shard_time_s'))} "
                     f"| {'–' if ratio is None else format(ratio, '.2f') + '×'} "
                     f"| {'–' if ratio is None else ('yes' if ratio <= SHARD_TARGET else 'no')} | {note} |")
    return lines


def _ms(t) -> str:
    return "–" if t is None else f"{t * 1e3:.2f}"


def sparse_table(ctx: Context) -> List[str]:
    """The sparse-teacher rows (sparse_gpu_check.py): time against 2 N V bytes at the copy bandwidth."""
    data = bench_json(ctx, SPARSE_RUN)
    if not data:
        return []
    bw = data["meta"]["machine"].get("copy_bandwidth_Bps") or 0
    lines = ["", f"Sparse teachers (K = {data['meta'].get('k')}, bf16, T = {data['meta'].get('temperature')}), median "
                 f"forward + backward against the two-pass floor 2·N·V·bytes at {bw / 1e12:.2f} TB/s (issue 11: "
                 "≤ 1.6 ms for cuda, forward KL, bucket, 8192x128256):", "",
             "| kernel | shape | tail | divergence | time (ms) | % of floor | loss err | grad err | note |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in data["rows"]:
        t = r.get("time_s")
        lines.append(f"| {r['impl']} | {r['shape']} | {r['tail']} | {r['divergence']} "
                     f"| {'' if t is None else format(t * 1e3, '.3f')} "
                     f"| {'' if t is None else format(r['pct_of_floor'], '.0f') + '%'} "
                     f"| {r.get('loss_err', float('nan')):.1e} | {r.get('grad_err', float('nan')):.1e} "
                     f"| {(r.get('error') or r.get('kernel') or '').replace('|', '/')[:80]} |")
    return lines


def _cell(r: Dict) -> str:
    if "error" in r:
        return "error"
    return f"{r['pct_of_floor']:.0f}% ({r['time_s'] * 1e3:.2f} ms)"


def _x(v) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2 ** 20:.0f}"


def target_table(kd_rows) -> List[str]:
    def pct(label, div, shape=TARGET_SHAPE):
        hit = [r for lab, r in kd_rows if lab == label and r["divergence"] == div and r["shape"] == shape]
        return hit[0].get("pct_of_floor") if hit else None

    rows = []
    for label, div, want in TARGETS:
        got = pct(label, div)
        rows.append((f"{label} {div} {TARGET_SHAPE}", f"≥ {want:.0f}% of floor",
                     "–" if got is None else f"{got:.0f}%", None if got is None else got >= want))
    triton = [r.get("pct_of_floor") for lab, r in kd_rows if lab == "triton" and r["shape"] != "16384x151936"]
    if triton:
        worst = min((p for p in triton if p is not None), default=None)
        rows.append(("triton, every kd shape and divergence", f"≥ {TRITON_TARGET:.0f}% of floor",
                     "–" if worst is None else f"{worst:.0f}% (worst)",
                     None if worst is None or len([p for p in triton if p is None]) else worst >= TRITON_TARGET))
    speed = [r.get("speedup_vs_compile") for lab, r in kd_rows
             if lab == "cuda (cluster)" and r["shape"] == TARGET_SHAPE]
    speed = [s for s in speed if s is not None]
    if speed:
        rows.append((f"cuda (cluster) vs torch.compile, {TARGET_SHAPE}", f"≥ {COMPILE_SPEEDUP_TARGET:.0f}×",
                     f"{min(speed):.1f}× (worst divergence)", min(speed) >= COMPILE_SPEEDUP_TARGET))
    if not kd_rows:
        return []
    out = ["", "Targets (issue 10, §3; H100):", "", "| what | target | measured | met |", "|---|---|---|---|"]
    for what, want, got, met in rows:
        out.append(f"| {what} | {want} | {got} | {'–' if met is None else ('yes' if met else 'no')} |")
    return out


def write_summary(ctx: Context, state: Dict[str, Dict], argv: List[str]) -> str:
    env = read_json(ctx.path("env.json")) or {}
    commit = _git_commit()
    lines = [f"# fastkd GPU check ({_dt.datetime.now().isoformat(timespec='seconds')})", "",
             f"- device: {env.get('device', 'n/a')} (sm {env.get('capability', '?')}); torch {env.get('torch', '?')} "
             f"CUDA {env.get('torch_cuda', '?')}, nvcc {env.get('nvcc', '?')}, triton {env.get('triton', '?')}, "
             f"liger {env.get('liger_kernel') or 'not installed'}",
             f"- commit: {commit}; out: `{ctx.out}`",
             f"- last command: `bash benchmarks/gpu_check.sh {' '.join(shlex.quote(a) for a in argv)}`", "",
             "| # | step | status | time | budget | detail |", "|---|---|---|---:|---:|---|"]
    for i, step in enumerate(STEPS[:-1], 1):
        s = state.get(step)
        if s is None:
            lines.append(f"| {i} | {step} | not run | | {BUDGETS[step]} s | |")
            continue
        lines.append(f"| {i} | {step} | {s['status']} | {s['seconds']:.0f} s | {s['budget']:.0f} s "
                     f"| {s['detail'].replace('|', '/')} |")
    redo = [s for s in STEPS[:-1] if state.get(s, {}).get("status") != "pass"]
    if redo:
        lines += ["", "Re-run what did not pass (same out folder: the summary keeps the other steps):", "",
                  f"    bash benchmarks/gpu_check.sh --out {ctx.out} --steps {','.join(redo)}"]
    lines += [""] + floor_tables(ctx)
    smoke = read_json(ctx.path("smoke/gpu_smoke.json"))
    if smoke:
        bad = [c for c in smoke["cases"] if not c["ok"]]
        if bad:
            lines += ["", f"Smoke failures ({len(bad)} of {smoke['total']}; all in smoke/gpu_smoke.json):", ""]
            lines += [f"- {_case_name(c)}: {'; '.join(c['problems'])}" for c in bad[:20]]
    text = "\n".join(lines) + "\n"
    ctx.path("summary.md").write_text(text)
    ctx.path("summary.json").write_text(json.dumps({"env": env, "commit": commit, "steps": state}, indent=1))
    return text


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + (" (modified)" if dirty else "")) if out.returncode == 0 else "n/a (no git)"
    except (OSError, subprocess.TimeoutExpired):
        return "n/a (no git)"


def export(ctx: Context, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("summary.md", "summary.json"):
        if ctx.path(name).is_file():
            shutil.copy2(ctx.path(name), dest / name)
    with tarfile.open(dest / "gpu_check_logs.tar.gz", "w:gz") as tar:
        tar.add(ctx.out, arcname=ctx.out.name or "gpu_check")
    print(f"exported summary.md, summary.json, gpu_check_logs.tar.gz to {dest}", flush=True)


# ---------------------------------------------------------------------------------------

RUNNERS: Dict[str, Callable] = {"env": run_env, "build": run_build, "smoke": run_smoke, "tests": run_tests,
                                "sanitizer": run_sanitizer, "bench": run_bench}
COMMANDS: Dict[str, Callable] = {"env": env_commands, "build": build_commands, "smoke": smoke_commands,
                                 "tests": tests_commands, "sanitizer": sanitizer_commands, "bench": bench_commands}


def dry_run(ctx: Context, steps: List[str]) -> int:
    total = 0
    print(f"gpu_check dry run: {len(steps)} steps, out folder {ctx.out}\n")
    for i, step in enumerate(STEPS, 1):
        if step not in steps:
            continue
        total += BUDGETS[step]
        print(f"[{i}/{len(STEPS)}] {step} (budget {BUDGETS[step]} s, expected ~{EXPECTED[step]} s): {DESCRIPTIONS[step]}")
        if step == "summary":
            print(f"    writes {ctx.path('summary.md')} and summary.json from steps.json and the outputs above")
        for cmd in COMMANDS.get(step, lambda c: [])(ctx):
            print(f"    {cmd.shell()}    # budget {cmd.budget:.0f} s -> {cmd.log}")
        print()
    expected = sum(EXPECTED[s] for s in steps)
    print(f"expected ~{expected} s ({expected / 60:.1f} min) on an H100 (an estimate: no GPU run yet); budgets add up "
          f"to {total} s ({total / 60:.1f} min), the worst case. The tests run {TEST_JOBS} files at once, the four "
          f"sanitizer tools at once, the benchmarks one at a time. Under a 10-minute limit, pass --deadline 570.\n")
    checks = [
        ("bash -n benchmarks/gpu_check.sh", ["bash", "-n", str(ROOT / "benchmarks/gpu_check.sh")]),
        ("gpu_smoke.py --help", [ctx.python, str(ROOT / "tests/gpu_smoke.py"), "--help"]),
        ("bench_kd.py --help", [ctx.python, str(ROOT / "benchmarks/bench_kd.py"), "--help"]),
        ("sparse_gpu_check.py --help", [ctx.python, str(ROOT / "benchmarks/sparse_gpu_check.py"), "--help"]),
    ]
    ok = True
    for name, what, source in (("SOFTCAP_PY", "the softcap benchmark", SOFTCAP_PY),
                               ("MULTI_PY", "the several-teachers benchmark", MULTI_PY),
                               ("SHARD_PY", "the vocab-parallel shard benchmark", SHARD_PY)):
        try:
            compile(source, f"<gpu_check.py: {name}>", "exec")
            print(f"check ok   compiles: {what} ({name})")
        except SyntaxError as e:
            ok = False
            print(f"check FAIL compiles: {what} ({name}): {e}")
    for path in ["benchmarks/gpu_check.py", "tests/gpu_smoke.py", "benchmarks/bench_kd.py",
                 "benchmarks/sparse_gpu_check.py", "setup.py"] + \
            [f for f, *_ in TEST_FILES]:
        try:
            compile((ROOT / path).read_text(), str(ROOT / path), "exec")  # parses; writes nothing
            print(f"check ok   compiles: {path}")
        except (SyntaxError, OSError) as e:
            ok = False
            print(f"check FAIL compiles: {path}: {e}")
    env = ctx.base_env()
    for name, argv in checks:
        r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
        good = r.returncode == 0
        ok &= good
        print(f"check {'ok  ' if good else 'FAIL'} {name}" + ("" if good else f": exit {r.returncode}\n{r.stderr[-2000:]}"))
    # The smoke commands' arguments parse (gpu_smoke.parse_args imports nothing heavy).
    sys.path.insert(0, str(ROOT / "tests"))
    import gpu_smoke  # noqa: E402

    for cmd in smoke_commands(ctx) + sanitizer_commands(ctx):
        args = cmd.argv[cmd.argv.index("tests/gpu_smoke.py") + 1:]
        try:
            gpu_smoke.parse_args(args)
            print(f"check ok   gpu_smoke.py {' '.join(args)}: arguments parse")
        except SystemExit as e:
            ok = False
            print(f"check FAIL gpu_smoke.py {' '.join(args)}: {e}")
    print(f"\ndry run: {'every check passed' if ok else 'some checks FAILED'}")
    return 0 if ok else 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check"),
                   help="folder for every log, the outputs and the summary (default: benchmarks/results/gpu_check)")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma-separated subset of {','.join(STEPS)} (default: all; the summary is always written)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the steps and their commands; check that every script parses (no GPU needed)")
    p.add_argument("--deadline", type=float, default=0,
                   help="seconds the whole call may take (e.g. 570 under a 10-minute limit); steps that no longer "
                        "fit are skipped, the summary is still written")
    p.add_argument("--export", default=None, help="also copy summary.md, summary.json and a tarball of --out here")
    p.add_argument("--rebuild", action="store_true", help="build even when the last build is up to date")
    p.add_argument("--python", default=os.environ.get("PYTHON") or sys.executable,
                   help="the Python that runs every step (default: $PYTHON, else this one)")
    args = p.parse_args(argv)
    args.step_list = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in args.step_list if s not in STEPS]
    if bad:
        p.error(f"--steps: unknown {bad}; choose from {','.join(STEPS)}")
    if "summary" not in args.step_list:
        args.step_list.append("summary")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    ctx = Context(Path(args.out).resolve(), args.python, args.dry_run, args.deadline)
    if args.dry_run:
        return dry_run(ctx, args.step_list)
    ctx.out.mkdir(parents=True, exist_ok=True)
    state_path = ctx.path("steps.json")
    state: Dict[str, Dict] = read_json(state_path) or {}
    for step in STEPS[:-1]:
        if step not in args.step_list:
            continue
        res = StepResult(step, budget=BUDGETS[step], started=_dt.datetime.now().isoformat(timespec="seconds"))
        left = ctx.left()
        budget = BUDGETS[step] if left is None else min(BUDGETS[step], left)
        res.budget = budget
        print(f"[{STEPS.index(step) + 1}/{len(STEPS)}] {step}: {DESCRIPTIONS[step]} (budget {budget:.0f} s)", flush=True)
        if budget < MIN_STEP_S:
            res.status, res.detail = "skipped", f"--deadline: {max(left or 0, 0):.0f} s left"
        else:
            t0 = time.monotonic()
            end = t0 + budget
            try:
                kwargs = {"force": args.rebuild} if step == "build" else {}
                results = RUNNERS[step](ctx, end, res, **kwargs)
                res.commands = [asdict(r) for r in results]
            except Exception as e:  # noqa: BLE001 - a broken step must not stop the others
                res.status, res.detail = "FAIL", f"gpu_check.py: {type(e).__name__}: {e}"
            res.seconds = time.monotonic() - t0
        print(f"    -> {res.status} ({res.seconds:.0f} s): {res.detail}", flush=True)
        state[step] = asdict(res)
        state_path.write_text(json.dumps(state, indent=1))
    print(flush=True)
    print(write_summary(ctx, state, argv), flush=True)
    print(f"wrote {ctx.path('summary.md')}, summary.json, steps.json; logs in {ctx.path('logs')}", flush=True)
    if args.export:
        export(ctx, Path(args.export))
    chosen = [s for s in args.step_list if s != "summary"]
    return 0 if all(state.get(s, {}).get("status") == "pass" for s in chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
