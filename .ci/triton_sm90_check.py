"""Compile every Triton kernel configuration fastkd's launcher can pick for sm_90, without a GPU.

For each configuration class the launcher can return (``fastkd.backends.triton.config_classes()``:
one per divergence, path, warp count and peel, at its largest block) and each dtype-pair class
(16-bit pair, fp32 pair, mixed), the forward kernel is compiled with its heaviest flags
(labels, CE at T != 1, computed statistics) through ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))``; the PTX is assembled with ``ptxas -v`` for sm_90a and
the registers, spill stores/loads and stack frame are read from its report. The row-stats
and scale-grad kernels, and the vocabulary-split kernels at each multi-block class
(``split_config_classes()``), are checked too. Exit status 1 when any configuration spills, or
when a peeled configuration (odd V: rows not on 16 bytes) has no 16-byte vector load
(``ld.global.v4``) in its PTX: the peel exists to give its body loop those.

Those are compiled with every logit option off (OPTS = 0: the kernels as they were before the
options). Options-on variants (``options_jobs``: both softcaps, label smoothing and z-loss) are
compiled and listed too; they fail the check when they do not compile or assemble, while
their spills are reported, not gating (measured: 4-byte scalar spills of triton's ptxas,
one store and one load per row, in the sparse kernel with a student softcap and the split
path's tvd write pass with every option). The launcher already gives them a smaller
single block where one spilled in its loop (launch.SINGLE_BLOCK_MAX_OPTIONS).

The several-teachers kernel (multi.py) is compiled at each teacher count of
``launch.multi_config_classes()``, every divergence, mode and dtype class (``multi_jobs``;
the options-on variants at 1 and 4 teachers). Its spills gate only where one lies inside a
loop of the SASS (``loop_spills``, disassembled with cuobjdump): ptxas keeps a few of its
per-teacher row scalars on the stack across a sweep, one store and one load per row.
``--only multi`` compiles those alone.

The per-token diagnostics (return_stats=True) are a constexpr too (RETURN_STATS, with their
output pointers None when off: constexprs, not parameters), so the kernels above compile as
without them. Stats-on variants (``stats_jobs``) are reported like the options-on ones
(measured: 4- to 8-byte spills of triton's ptxas in the JSD write passes; the launcher caps
their single block at 8192 columns, as with the options).

Run in a process where TRITON_INTERPRET is unset (the interpreter replaces @triton.jit at
import time); this script clears it itself before importing triton:

    python .ci/triton_sm90_check.py            # table on stdout, exit 1 on spills
    python .ci/triton_sm90_check.py --json out.json
"""
import argparse
import concurrent.futures as futures
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default; silences 3.9's notice
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARCH = 90
PTX_VERSION = 90  # PTX ISA 9.0: accepted by the CUDA 13.0 toolkit's ptxas and by triton's own

DTYPE_CLASSES = {  # name -> (student, teacher) triton pointer element types
    "16bit": ("bf16", "bf16"),
    "fp32": ("fp32", "fp32"),
    "mixed": ("bf16", "fp32"),
}

ELEMENT_BYTES = {"bf16": 2, "fp32": 4}

# The logit options' scalars every kernel takes (fastkd/backends/triton/rows.py: XO), and the
# heaviest OPTS (both sides softcapped, label smoothing and z-loss with the CE term), which the
# options-on variants compile with (``options_on``).
OPTION_SCALARS = {name: "fp32" for name in ("s_mul", "s_cap", "s_scale", "s_inv_cap", "t_mul", "t_cap", "ce_keep",
                                              "smooth", "z_loss")}


def options_on() -> int:
    from fastkd.backends.triton import rows

    return rows.X_CAP | (rows.X_CAP << 2) | rows.OPT_SMOOTH | rows.OPT_ZLOSS


def _opts_name(opts) -> str:
    return f" opts={opts}" if opts else ""

_REG_RE = re.compile(r"Used (\d+) registers")
_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_tools():
    """[(label, path, extra flags)]: triton's own ptxas for sm_90 (what runs at run time,
    with triton's flags) and the CUDA toolkit's ptxas on PATH, when present."""
    from triton.backends.nvidia.compiler import get_ptxas

    tools = [("triton", get_ptxas(ARCH).path, ["-lineinfo", "--regAllocOptLevel=2"])]
    system = shutil.which("ptxas")
    if system and os.path.realpath(system) != os.path.realpath(tools[0][1]):
        tools.append(("toolkit", system, []))
    return tools


def stats_constexprs(stats: bool) -> dict:
    """The per-token diagnostics' kernel arguments (return_stats=True): off, their output
    pointers are None (constexprs: the kernels compile as without them); on, fp32 tables
    (the split path's argmax columns int32)."""
    if not stats:
        return dict(RETURN_STATS=False, STATS_OUT=None, TOP1_PART=None, STATS_PART=None)
    return dict(RETURN_STATS=True)


STATS_POINTERS = {"STATS_OUT": "*fp32", "TOP1_PART": "*i32", "STATS_PART": "*fp32"}


def _stats_name(stats) -> str:
    return " stats" if stats else ""


def _with_stats_args(fn, constexprs, signature):
    """The constexprs of ``fn``'s arguments among ``constexprs`` (every kernel does not take
    every stats argument), with its stats pointers that are not constexprs (stats on) added
    to ``signature``; returns (constexprs, those pointers' names: 16-byte aligned)."""
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    pointers = [a for a in STATS_POINTERS if a in fn.arg_names and a not in constexprs]
    signature.update({a: STATS_POINTERS[a] for a in pointers})
    return constexprs, pointers


def _forward_job(divergence, cfg, vocab, dtype_class, opts=0, stats=False):
    from fastkd.backends.triton import dense, rows

    s_ty, t_ty = DTYPE_CLASSES[dtype_class]
    fn = dense.kd_forward_kernel
    peel = _peel(divergence, cfg, vocab, dtype_class)
    signature = {
        "S": f"*{s_ty}", "T": f"*{t_ty}", "G": f"*{s_ty}", "LOSS": "*fp32", "LABELS": "*i64",
        "GRAD_SCALE": "*fp32", "STATS": "*fp32", "SUMS": "*fp32",
        "s_stride": "i32", "t_stride": "i32", "g_stride": "i32", "V": "i32", "g_width": "i32", "s_lead": "i32",
        "vocab_start": "i32", "c": "fp32", "inv_temperature": "fp32", "temperature": "fp32", "beta": "fp32", "log2_beta": "fp32",
        "log2_1mb": "fp32", "div_weight": "fp32", "ce_weight": "fp32", "ignore_index": "i32", **OPTION_SCALARS,
    }
    constexprs = dict(DIVERGENCE=dense.DIVERGENCE_IDS[divergence], HAS_LABELS=True, CE=rows.CE_RAW,
                      HAS_STATS=False, HAS_SUMS=False, SHARD=False, BLOCK=cfg.block, SINGLE_BLOCK=cfg.single_block,
                      PEEL=peel, OPTS=opts, **stats_constexprs(stats))
    constexprs, stats_pointers = _with_stats_args(fn, constexprs, signature)
    # As the JIT specialises a launch: 16-byte aligned pointers, and strides and widths
    # divisible by 16 where the vocabulary is (128256, 151936, ... are).
    aligned = ["S", "T", "G", "LOSS", "LABELS", "GRAD_SCALE", "STATS", "SUMS"] + stats_pointers
    if vocab % 16 == 0:
        aligned += ["s_stride", "t_stride", "g_stride", "V", "g_width"]
    name = f"forward {divergence:10s} {'single' if cfg.single_block else 'multi '} block={cfg.block:<5d} " \
           f"warps={cfg.num_warps:<2d} {dtype_class:6s} (V={vocab}{', peel' if peel else ''}){_opts_name(opts)}" \
           f"{_stats_name(stats)}"
    return name, fn, signature, constexprs, aligned, cfg.num_warps, cfg.num_stages


def _peel(divergence, cfg, vocab, dtype_class):
    """PEEL as the launcher sets it for contiguous, freshly allocated rows of ``vocab`` columns
    (``divergence`` None: the row_stats kernel)."""
    from fastkd.backends.triton import launch

    if not launch.peeled_variant(cfg, vocab):
        return 0
    return launch.peel_elements(divergence, *(ELEMENT_BYTES[ty] for ty in DTYPE_CLASSES[dtype_class]))


def _row_stats_job(dtype_class, odd_vocab, opts=0):
    from fastkd.backends.triton import dense, launch, rows

    s_ty, t_ty = DTYPE_CLASSES[dtype_class]
    block = launch.MULTI_BLOCK
    signature = {"S": f"*{s_ty}", "T": f"*{t_ty}", "OUT": "*fp32", "s_stride": "i32", "t_stride": "i32", "V": "i32",
                 "s_lead": "i32", "c": "fp32", "inv_temperature": "fp32", "temperature": "fp32", **OPTION_SCALARS}
    vocab = 50257 if odd_vocab else 32000
    peel = _peel(None, launch.LaunchConfig(block, False, launch.warps_for(block)), vocab, dtype_class)
    constexprs = dict(RAW=rows.CE_RAW, BLOCK=block, PEEL=peel, OPTS=opts)
    aligned = ["S", "T", "OUT"] + ([] if odd_vocab else ["s_stride", "t_stride", "V"])
    name = f"row_stats  block={block:<5d} warps={launch.warps_for(block):<2d} {dtype_class:6s} (V={vocab}" \
           f"{', peel' if peel else ''}){_opts_name(opts)}"
    return name, dense.row_stats_kernel, signature, constexprs, aligned, launch.warps_for(block), 1


def _scale_grad_job(dtype):
    from fastkd.backends.triton import launch, scale_grad

    signature = {"G": f"*{dtype}", "GO": "*fp32", "g_stride": "i32", "go_stride": "i32", "width": "i32"}
    constexprs = dict(PER_ROW=True, BLOCK=launch.SCALE_BLOCK)
    name = f"scale_grad block={launch.SCALE_BLOCK:<5d} warps=8  {dtype}"
    return name, scale_grad.scale_grad_kernel, signature, constexprs, ["G", "GO", "g_stride", "width"], 8, 1


def _split_job(kernel, divergence, cfg, vocab, dtype_class, opts=0, stats=False):
    """A kernel of the vocabulary-split path (split.py) at a multi-block class, with the
    heaviest flags (labels, CE at T != 1) and the forward kernel's peel."""
    from fastkd.backends.triton import dense, launch, rows, split

    s_ty, t_ty = DTYPE_CLASSES[dtype_class]
    fn = getattr(split, f"split_{kernel}_kernel")
    peel = _peel(divergence, cfg, vocab, dtype_class)
    pointers = {"S": f"*{s_ty}", "T": f"*{t_ty}", "G": f"*{s_ty}", "LABELS": "*i64", "GRAD_SCALE": "*fp32",
                "PART": "*fp32", "SUMS": "*fp64", "LOSS_PART": "*fp32"}
    constexprs = dict(DIVERGENCE=dense.DIVERGENCE_IDS[divergence], HAS_LABELS=True, CE=rows.CE_RAW,
                      BLOCK=cfg.block, PEEL=peel, SPLITS=launch.MAX_SPLITS, OPTS=opts, **stats_constexprs(stats))
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    pointers.update(STATS_POINTERS)
    signature = {a: pointers.get(a, "i32" if a in _SPLIT_INTS else "fp32")
                 for a in fn.arg_names if a not in constexprs}
    # The chunk is whole blocks (launch.vocab_splits): the JIT always specialises it % 16.
    aligned = [a for a in signature if signature[a].startswith("*")] + ["chunk"]
    if vocab % 16 == 0:
        aligned += [a for a in ("s_stride", "t_stride", "g_stride", "V", "g_width") if a in signature]
    name = f"split {kernel:10s} {divergence if kernel != 'row_stats' else '':10s} block={cfg.block:<5d} " \
           f"warps={cfg.num_warps:<2d} {dtype_class:6s} (V={vocab}{', peel' if peel else ''}){_opts_name(opts)}" \
           f"{_stats_name(stats)}"
    return name, fn, signature, constexprs, aligned, cfg.num_warps, cfg.num_stages


def _sparse_job(divergence, tail, k, dtype_class, opts=0, stats=False):
    """The sparse-teacher kernel (fastkd/backends/triton/sparse.py) at the sweeps' full block,
    with labels and CE at T != 1; K slots in a power-of-two block (64: the benchmark's K;
    1024: the largest the issue asks for)."""
    from fastkd.backends.triton import rows, sparse

    s_ty = {"16bit": "bf16", "fp32": "fp32", "mixed": "bf16"}[dtype_class]
    lp_ty = {"16bit": "bf16", "fp32": "fp32", "mixed": "fp32"}[dtype_class]
    block, k_block, warps = sparse.launch_shape(128256, k)
    fn = sparse.sparse_kd_forward_kernel
    signature = {
        "S": f"*{s_ty}", "G": f"*{s_ty}", "IDS": "*i64", "LPS": f"*{lp_ty}", "SORTED": "*i32", "LOSS": "*fp32",
        "LABELS": "*i64", "GRAD_SCALE": "*fp32",
        "n_rows": "i32", "s_stride": "i32", "g_stride": "i32", "ids_stride": "i32", "lps_stride": "i32",
        "K": "i32", "V": "i32",
        "g_width": "i32", "c": "fp32", "inv_temperature": "fp32", "temperature": "fp32", "beta": "fp32",
        "log_beta": "fp32", "log_1mb": "fp32", "div_weight": "fp32", "ce_weight": "fp32", "ignore_index": "i32",
        **OPTION_SCALARS,
    }
    constexprs = dict(DIVERGENCE=sparse.DIVERGENCE_IDS[divergence], TAIL=sparse.TAIL_IDS[tail], HAS_LABELS=True,
                      CE=rows.CE_RAW, SWEEP=True, BLOCK=block, K_BLOCK=k_block, PERSISTENT=False, OPTS=opts,
                      **stats_constexprs(stats))
    constexprs, stats_pointers = _with_stats_args(fn, constexprs, signature)
    aligned = ["S", "G", "IDS", "LPS", "SORTED", "LOSS", "LABELS", "GRAD_SCALE", "s_stride", "g_stride", "V",
               "g_width"] + stats_pointers
    name = f"sparse  {divergence:10s} {tail:6s} block={block:<5d} K={k_block:<4d} warps={warps:<2d} {dtype_class:6s}" \
           f"{_opts_name(opts)}{_stats_name(stats)}"
    return name, fn, signature, constexprs, aligned, warps, 1


def _multi_job(teachers, divergence, mode, dtype_class, opts=0):
    """The several-teachers kernel (fastkd/backends/triton/multi.py) with ``teachers`` teachers
    at its block for a realistic vocabulary (launch.multi_config_classes), with labels and
    CE at T != 1. Dtype classes: every tensor bf16 (16bit), fp32, or a bf16 student with
    teachers alternately fp32 and bf16 (mixed: the per-pointer specialisation)."""
    from fastkd.backends.triton import launch, multi, rows

    cfg = dict((k, c) for k, c, _ in launch.multi_config_classes())[teachers]
    s_ty, t_ty = DTYPE_CLASSES[dtype_class]
    t_types = [t_ty if i % 2 == 0 or dtype_class != "mixed" else s_ty for i in range(4)]
    signature = {"S": f"*{s_ty}", **{f"T{i}": f"*{t_types[i]}" for i in range(4)}, "G": f"*{s_ty}", "LOSS": "*fp32",
                 "LABELS": "*i64", "GRAD_SCALE": "*fp32", "WEIGHTS": "*fp32"}
    ints = ["s_stride", "t_stride0", "t_stride1", "t_stride2", "t_stride3", "w_stride_k", "w_stride_n", "g_stride",
            "V", "g_width", "ignore_index"]
    fn = multi.multi_kd_forward_kernel
    constexprs = dict(K=teachers, DIVERGENCE=multi.DIVERGENCE_IDS[divergence], MODE=multi.MODE_IDS[mode],
                      HAS_LABELS=True, CE=rows.CE_RAW, BLOCK=cfg.block, OPTS=opts)
    for a in fn.arg_names:
        if a not in signature and a not in constexprs:
            signature[a] = "i32" if a in ints else "fp32"
    aligned = [a for a in signature if signature[a].startswith("*")]
    aligned += ["s_stride", "t_stride0", "t_stride1", "t_stride2", "t_stride3", "g_stride", "V", "g_width"]
    name = f"multi   K={teachers} {divergence:10s} {mode:7s} block={cfg.block:<5d} warps={cfg.num_warps:<2d} " \
           f"{dtype_class:6s}{_opts_name(opts)}"
    return name, fn, signature, constexprs, aligned, cfg.num_warps, cfg.num_stages


_SPLIT_INTS = ("s_stride", "t_stride", "g_stride", "V", "g_width", "chunk", "s_lead", "ignore_index")


def jobs():
    from fastkd.backends.triton import launch

    out = []
    for divergence, cfg, vocab in launch.config_classes():
        for dtype_class in DTYPE_CLASSES:
            out.append(("forward", (divergence, cfg, vocab, dtype_class)))
    for divergence, cfg, vocab in launch.split_config_classes():
        for dtype_class in DTYPE_CLASSES:
            if divergence == "forward_kl" or _peel(divergence, cfg, vocab, dtype_class) != _peel(
                    "forward_kl", cfg, vocab, dtype_class):  # the row_stats pass: one per peel
                out.append(("split", ("row_stats", divergence, cfg, vocab, dtype_class)))
            if divergence != "forward_kl":
                out.append(("split", ("row_sums", divergence, cfg, vocab, dtype_class)))
            out.append(("split", ("write_grad", divergence, cfg, vocab, dtype_class)))
    for dtype_class in DTYPE_CLASSES:
        for odd_vocab in (False, True):
            out.append(("row_stats", (dtype_class, odd_vocab)))
    for dtype in ("bf16", "fp32"):
        out.append(("scale_grad", (dtype,)))
    for divergence in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        for tail in ("bucket", "renorm"):
            for dtype_class in DTYPE_CLASSES:
                out.append(("sparse", (divergence, tail, 64, dtype_class)))
    out.append(("sparse", ("forward_kl", "none", 64, "16bit")))
    for divergence in ("forward_kl", "jsd"):
        out.append(("sparse", (divergence, "bucket", 1024, "16bit")))
    return out + multi_jobs() + options_jobs() + stats_jobs()


MULTI_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
MULTI_MODES = ("mixture", "sum")


def multi_jobs():
    """The several-teachers kernel: every teacher count, divergence and mode, at every dtype class."""
    from fastkd.backends.triton import launch

    return [("multi", (teachers, divergence, mode, dtype_class))
            for teachers, _, _ in launch.multi_config_classes() for divergence in MULTI_DIVERGENCES
            for mode in MULTI_MODES for dtype_class in DTYPE_CLASSES]


def options_jobs():
    """Options-on variants (``options_on``: both softcaps, label smoothing, z-loss): the
    forward kernel at every configuration class, the split passes at each multi-block class
    (the row_stats pass once per peel, with forward_kl's), the row_stats kernel and the
    sparse kernel, for 16-bit logits (the options change the arithmetic after the loads,
    the same for every dtype class)."""
    from fastkd.backends.triton import launch, rows

    opts = options_on()
    out = [("forward", (divergence, cfg, vocab, "16bit", opts))
           for divergence, cfg, vocab in launch.config_classes(options=True)]
    for divergence, cfg, vocab in launch.split_config_classes(options=True):
        out.append(("split", ("row_stats" if divergence == "forward_kl" else "row_sums", divergence, cfg, vocab, "16bit",
                              opts)))
        out.append(("split", ("write_grad", divergence, cfg, vocab, "16bit", opts)))
    out.append(("row_stats", ("16bit", True, opts & rows.TRANSFORMS)))  # as dense.row_stats launches it
    out += [("sparse", (divergence, "bucket", 64, "16bit", opts)) for divergence in ("forward_kl", "reverse_kl", "jsd",
                                                                                       "tvd")]
    out += [("multi", (teachers, divergence, mode, "16bit", opts)) for teachers in (1, 4)
            for divergence in MULTI_DIVERGENCES for mode in MULTI_MODES]
    return out


def stats_jobs():
    """Stats-on variants (return_stats=True: the per-token diagnostics, ``stats_constexprs``):
    the forward kernel at every configuration class, the split passes that write them (the
    row_stats pass once per peel, the write pass at each multi-block class) and the sparse
    kernel, for 16-bit logits, options off. Reported like the options-on variants: they fail
    the check when they do not compile or assemble, their spills are listed, not gating."""
    from fastkd.backends.triton import launch

    out = [("forward", (divergence, cfg, vocab, "16bit", 0, True))
           for divergence, cfg, vocab in launch.config_classes(stats=True)]
    for divergence, cfg, vocab in launch.split_config_classes(stats=True):
        if divergence == "forward_kl" or _peel(divergence, cfg, vocab, "16bit") != _peel("forward_kl", cfg, vocab,
                                                                                           "16bit"):
            out.append(("split", ("row_stats", divergence, cfg, vocab, "16bit", 0, True)))
        out.append(("split", ("write_grad", divergence, cfg, vocab, "16bit", 0, True)))
    out += [("sparse", (divergence, "bucket", 64, "16bit", 0, True)) for divergence in ("forward_kl", "reverse_kl",
                                                                                          "jsd", "tvd")]
    return out


def compile_one(kind, args):
    """Compile one configuration; returns a result dict (name, registers, spills per ptxas)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    make = {"forward": _forward_job, "row_stats": _row_stats_job, "scale_grad": _scale_grad_job,
            "split": _split_job, "sparse": _sparse_job, "multi": _multi_job}[kind]
    name, fn, signature, constexprs, aligned, num_warps, num_stages = make(*args)
    for k in constexprs:
        signature[k] = "constexpr"
    arg_names = fn.arg_names
    attrs = {(arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", ARCH, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages, ptx_version=PTX_VERSION))
    ptx = compiled.asm["ptx"]
    result = dict(name=name, kind=kind, shared=compiled.metadata.shared, compile_s=round(time.time() - t0, 2),
                  peeled=bool(constexprs.get("PEEL")), options=bool(constexprs.get("OPTS")),
                  stats=bool(constexprs.get("RETURN_STATS")),
                  v4_loads=ptx.count("ld.global.v4"),
                  v4_stores=ptx.count("st.global.v4"), ptxas={})
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for label, path, flags in ptxas_tools():
            proc = subprocess.run([path, "-v", f"-arch=sm_{ARCH}a", *flags, src, "-o", os.path.join(tmp, "k.o")],
                                  capture_output=True, text=True)
            report = proc.stdout + proc.stderr
            if proc.returncode != 0:
                result["ptxas"][label] = dict(error=report.strip()[-500:])
                continue
            regs = _REG_RE.search(report)
            spill = _SPILL_RE.search(report)
            result["ptxas"][label] = dict(registers=int(regs.group(1)), stack=int(spill.group(1)),
                                          spill_stores=int(spill.group(2)), spill_loads=int(spill.group(3)))
            if spill.group(2) != "0" or spill.group(3) != "0":
                result["ptxas"][label]["loop_spills"] = loop_spills(os.path.join(tmp, "k.o"))
    return result


_SASS_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH_RE = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)\s*$")


def loop_spills(cubin: str) -> int:
    """Spill instructions (STL/LDL) inside a loop of the assembled kernel, from its SASS
    (cuobjdump, triton's or the toolkit's): a loop is the range of a backward branch. -1
    where no cuobjdump runs. Those outside every loop run once per program (a row's scalar
    kept across a sweep); those inside run per block."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = os.path.join(os.path.dirname(get_ptxas(ARCH).path), "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if not tool:
        return -1
    sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True).stdout
    spills_at, loops = [], []
    for address, instruction in _SASS_RE.findall(sass):
        at = int(address, 16)
        if re.search(r"\b(STL|LDL)\b", instruction):
            spills_at.append(at)
        branch = _BRANCH_RE.search(instruction)
        if branch and int(branch.group(1), 16) < at:
            loops.append((int(branch.group(1), 16), at))
    return sum(any(lo <= at <= hi for lo, hi in loops) for at in spills_at)


def spills(result) -> bool:
    return any("error" in r or r["spill_stores"] or r["spill_loads"] or r["stack"]
               for r in result["ptxas"].values())


def assembly_failed(result) -> bool:
    return any("error" in r for r in result["ptxas"].values())


def spills_in_loops(result) -> bool:
    """A spill that is not known to lie outside every loop (``loop_spills``)."""
    return any("error" in r or r.get("loop_spills", 0) != 0 or (r["stack"] and "loop_spills" not in r)
               for r in result["ptxas"].values())


def gating(result) -> bool:
    """Whether the result fails the check: a spill with the options and the stats off, or no
    assembly. The several-teachers kernel's spills gate only inside a loop: ptxas keeps some of
    its per-teacher row scalars (pointers, normalisers) on the stack across a sweep, one store
    and one load per row, a cost it trades for occupancy and which no launch shape avoids for
    every teacher count, divergence and mode."""
    quiet = not result["options"] and not result.get("stats", False)
    if result["kind"] == "multi":
        return assembly_failed(result) or (spills_in_loops(result) and quiet)
    return assembly_failed(result) or (spills(result) and quiet)


def unvectorised_peel(result) -> bool:
    """A peeled configuration whose PTX has no 16-byte vector load."""
    return result["peeled"] and not result["v4_loads"]


def run(max_workers=None, only=None):
    todo = [job for job in jobs() if only is None or job[0] in only]
    workers = max_workers or min(len(todo), os.cpu_count() or 1)
    # Fresh interpreters, not forks: this process has imported torch and triton, and a fork
    # of a process with threads can deadlock in the child.
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(compile_one, *zip(*todo)))
    return results


def format_table(results) -> str:
    labels = sorted({label for r in results for label in r["ptxas"]}, key=lambda x: x != "triton")
    head = f"{'configuration (sm_90a)':64s} " + " ".join(f"{lab + ' regs/spill st/ld':>24s}" for lab in labels) + \
        f" {'v4 ld/st':>9s} {'smem':>6s} {'compile':>7s}"
    lines = [head, "-" * len(head)]
    for r in results:
        cells = []
        for lab in labels:
            p = r["ptxas"].get(lab, {})
            cells.append(f"{'ERROR':>24s}" if "error" in p else
                         f"{p['registers']:>10d} / {p['spill_stores']:>4d} / {p['spill_loads']:<4d}  ")
        flag = "  <-- SPILLS" if gating(r) else "  <-- spills (options or stats on: reported)" \
            if spills(r) and (r["options"] or r.get("stats", False)) \
            else "  <-- spills outside loops (reported)" if spills(r) else ""
        flag += "  <-- PEEL NOT VECTORISED" if unvectorised_peel(r) else ""
        lines.append(f"{r['name']:64s} " + " ".join(cells) + f" {r['v4_loads']:>4d}/{r['v4_stores']:<4d}"
                     f" {r['shared']:>6d} {r['compile_s']:>6.1f}s{flag}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--only", nargs="+", metavar="KIND",
                        choices=("forward", "split", "row_stats", "scale_grad", "sparse", "multi"),
                        help="compile these kernel kinds alone (default: every one)")
    args = parser.parse_args(argv)
    t0 = time.time()
    results = run(args.workers, args.only)
    print(format_table(results))
    bad = [r["name"] for r in results if gating(r)]
    unvectorised = [r["name"] for r in results if unvectorised_peel(r)]
    with_options = [r for r in results if r["options"]]
    with_stats = [r for r in results if r["stats"]]
    print(f"\n{len(results)} configurations compiled for sm_90a in {time.time() - t0:.1f}s; "
          f"{len(bad)} spill or fail to assemble; {len(unvectorised)} peeled without vector loads; "
          f"options on: {sum(spills(r) for r in with_options)} of {len(with_options)} spill, stats on: "
          f"{sum(spills(r) for r in with_stats)} of {len(with_stats)} spill (reported, not gating)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if bad or unvectorised else 0


if __name__ == "__main__":
    sys.exit(main())
