"""Launch decisions of the Triton kernels, in one place: block sizes, path and warps.

Two shapes of the dense kernel, chosen per V by :func:`launch_config`:

* single block (V <= the divergence's register budget, SINGLE_BLOCK_MAX): the whole row of
  s and t is loaded once into registers; row_stats, row_sums and write_grad all work on
  them. Traffic: one read of s and t, one write of ds (the floor).
* multi block (MULTI_BLOCK columns per loop iteration): the row_stats sweep reads the row;
  forward_kl then reads it once more and writes the gradient (2 reads); reverse_kl, jsd and
  tvd need their row sums before any gradient entry is known, so they read it a second
  time for row_sums and a third time for write_grad.

Multi-block rows that do not start on 16 bytes (odd V) are peeled (rows.py: peeled rows)
where :func:`peel_columns` finds one lead that aligns every tensor. Every launch runs under
:func:`kernel_launch`: the tensors' device guard (Triton launches on the current device).

:func:`vocab_splits` cuts the multi-block rows' columns across programs when there are
few rows (dense.py's split path, split.py).

:func:`logit_options` selects the kernels' variant for the logit options (rows.py: OPTS and
its scalars), :func:`ce_mode` their T = 1 statistics: OPTS = 0 where no option is on.

:func:`config_classes` (and :func:`split_config_classes`) list the distinct configurations
these can return, for the sm_90 no-spill compile check (``.ci/triton_sm90_check.py``, tests/test_triton_compile.py).
"""
import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import triton

from .rows import (CE_NONE, CE_RAW, CE_SHARED, OPT_NO_CE, OPT_SMOOTH, OPT_ZLOSS, TRANSFORMS, X_CAP, X_SCALE,
                   kernels_interpreted)

MAX_BLOCK = 16384  # columns per tensor per block

# Largest power-of-two row kept whole in registers, per divergence. At 8 values of each
# tensor per thread (1024 threads hold 8192 columns) every divergence fits without
# spilling; forward_kl (s, t, then q - p: no row sum between the loads and the write)
# also fits 16 per thread at the 64-register cap of 1024 threads. The centred
# divergences at 16384 spill (q, h and log m live across two row reductions). Checked
# for sm_90 by tests/test_triton_compile.py.
SINGLE_BLOCK_MAX = {"forward_kl": 16384, "reverse_kl": 8192, "jsd": 8192, "tvd": 8192}
# With a logit option on, forward_kl's 16384-column block has no register left for the
# options' temporaries (16 to 164 bytes of spill for sm_90, by option): 8192 for every
# divergence (rows from 8193 to 16384 columns then take forward_kl's two-read sweeps).
# The same with the per-token diagnostics on (return_stats: 192 to 332 bytes of spill at
# 16384 for sm_90; none at 8192).
SINGLE_BLOCK_MAX_OPTIONS = {divergence: min(limit, 8192) for divergence, limit in SINGLE_BLOCK_MAX.items()}

# Columns per loop iteration in the multi-block sweeps: 8 per thread at 8 warps. ptxas
# aims at 64 registers here (four programs per SM); at 4096 columns x 16 warps the fp32
# sweeps spill to reach it, at 16 per thread they need ~120 (one program per SM).
MULTI_BLOCK = 2048

# The widest load a thread issues (ld.global.v4.b32): what a peeled row's body is aligned to.
VECTOR_BYTES = 16

# Columns per program of the scale_grad kernel (a grid of row x column blocks).
SCALE_BLOCK = 4096

# Tests force small blocks (the multi-block path at V ~ 1000 under the interpreter). Read
# at each launch as ``launch.BLOCK_OVERRIDE``.
BLOCK_OVERRIDE: Optional[int] = None


# The vocabulary split (:func:`vocab_splits`): few rows at a large V would leave most SMs
# idle with one program per row, so each row's columns are cut into splits of whole blocks,
# one program each. Aim: SPLIT_PROGRAMS programs (two per SM of an H100, 132 SMs), each
# split at least SPLIT_MIN_BLOCKS blocks long (its sweeps still stream, and the partial
# statistics stay a small fraction of the traffic), at most MAX_SPLITS splits (the width
# the combining programs load as one vector). Not yet tuned on a GPU.
SPLIT_PROGRAMS = 2 * 132
SPLIT_MIN_BLOCKS = 4
MAX_SPLITS = 64

# Tests force a number of splits (at V ~ 1000, with BLOCK_OVERRIDE). Read at each launch as
# ``launch.SPLIT_OVERRIDE``.
SPLIT_OVERRIDE: Optional[int] = None

# The sparse kernel (sparse.py): None launches one program per row; a number launches that
# many programs, which take the rows in turn (fewer rows in flight, so that the write pass's
# second read of a row can hit L2: 132 rows of 128256 bf16 are 33 MB, an H100's L2 50 MB).
# Unmeasured: benchmarks/sparse_gpu_check.py --triton-programs compares the choices.
SPARSE_PROGRAMS: Optional[int] = None


@dataclass(frozen=True)
class LaunchConfig:
    block: int           # columns of each tensor per block (power of two, <= MAX_BLOCK)
    single_block: bool   # the whole row lives in registers (one read of s and t)
    num_warps: int
    num_stages: int = 1  # the sweeps stream; no shared-memory pipelining of plain loads


def launch_config(vocab_size: int, student_dtype: torch.dtype, teacher_dtype: torch.dtype,
                  divergence: str, block_override: Optional[int] = None, options: bool = False,
                  stats: bool = False) -> LaunchConfig:
    """Block size, path and warps for one row of ``vocab_size`` columns; ``options``: a
    logit option is on (``logit_options`` gives a nonzero OPTS); ``stats``: the kernel
    writes the per-token diagnostics (return_stats).

    Eight fp32 values of each tensor per thread (two 16-byte loads of fp32, one of 16-bit
    data), sixteen only for forward_kl's 16384-column single block (32 warps is the most
    a program can have). Not yet tuned on a GPU: this is the one function to tune.
    """
    del student_dtype, teacher_dtype  # loads are cast to fp32 at once; the budget is fp32
    if block_override is not None:
        block = min(triton.next_power_of_2(int(block_override)), MAX_BLOCK)
        single = triton.next_power_of_2(vocab_size) <= block
        if single:
            block = triton.next_power_of_2(vocab_size)
        return LaunchConfig(block, single, warps_for(block))
    full = triton.next_power_of_2(vocab_size)
    if full <= (SINGLE_BLOCK_MAX_OPTIONS if options or stats else SINGLE_BLOCK_MAX)[divergence]:
        return LaunchConfig(full, True, warps_for(full))
    return LaunchConfig(MULTI_BLOCK, False, warps_for(MULTI_BLOCK))


# Several teachers (multi.py): (columns per block, warps) by teacher count K. The sweeps keep
# a running sum-exp vector per active teacher beside the student's (and the T = 1 one), the
# per-entry terms one vector per teacher, and each teacher's row pointer and normalisers
# live across the sweeps: at 8 columns per thread (as launch_config) the sm_90 build took
# 75 to 128 registers (two programs of 256 threads per SM at K = 4) and spilled 4 to 24
# bytes at K = 2 and 4. At 4 columns per thread
# (K <= 2) and 2 (K >= 3) it takes 40 to 76, and ptxas's few spills (4 to 12 bytes) lie
# outside every loop: one store and one load per row (.ci/triton_sm90_check.py --only multi).
# Every row is swept in blocks (no single-block path yet). Not yet tuned on a GPU.
MULTI_TEACHER_SHAPE = {1: (1024, 8), 2: (1024, 8), 3: (1024, 16), 4: (1024, 16)}


def multi_teacher_config(vocab_size: int, teachers: int, block_override: Optional[int] = None) -> LaunchConfig:
    """Block and warps of the several-teachers kernel for rows of ``vocab_size`` columns and
    ``teachers`` teachers: MULTI_TEACHER_SHAPE[teachers], the block cut to a shorter row
    (and its warps to 8 columns per thread; ``block_override``: tests)."""
    block, warps = MULTI_TEACHER_SHAPE[teachers]
    if block_override is not None:
        block = min(triton.next_power_of_2(int(block_override)), MAX_BLOCK)
    full = triton.next_power_of_2(vocab_size)
    if full < block:
        return LaunchConfig(full, False, warps_for(full))
    return LaunchConfig(block, False, warps if block_override is None else warps_for(block))


def multi_config_classes():
    """[(teachers, LaunchConfig, vocab)]: the several-teachers kernel's configurations at a
    realistic vocabulary (its largest block per teacher count), for the sm_90 check."""
    return [(k, multi_teacher_config(128256, k), 128256) for k in sorted(MULTI_TEACHER_SHAPE)]


def ce_mode(k) -> int:
    """The T = 1 statistics a launch computes (rows.py: CE modes), for the CE term or the
    z-loss: none, shared with the student's softmax (T == 1) or a third sum-exp."""
    if k.ce_weight == 0.0 and k.z_loss == 0.0:
        return CE_NONE
    return CE_SHARED if float(k.inv_temperature) == 1.0 else CE_RAW


def _side(scale: float, cap: float):
    """(transform bits, multiplier) of one side: m x, or c tanh((m / c) x); (0, 1.0) for neither."""
    if cap > 0.0:
        return X_CAP, scale / cap
    if scale != 1.0:
        return X_SCALE, scale
    return 0, 1.0


def logit_options(k, row_stats_sum: bool = False, transforms_only: bool = False):
    """(OPTS, XO) of a launch from its settings ``k`` (KernelSettings): the constexpr bit set
    and the tuple of fp32 scalars of rows.py (its module docstring: the logit options).
    OPT_SMOOTH goes with the CE term (it changes nothing without it), except for
    ``row_stats_sum`` (shard_row_stats: the sum of s' whenever label_smoothing > 0);
    ``transforms_only``: the transform bits alone, for a kernel that reads no T = 1 term
    (one compiled variant whatever the CE term's options)."""
    s_bits, s_mul = _side(k.logit_scale, k.softcap_value)
    t_bits, t_mul = _side(k.teacher_scale, k.teacher_softcap_value)
    opts = s_bits | (t_bits << 2)
    if k.label_smoothing != 0.0 and (k.ce_weight != 0.0 or row_stats_sum):
        opts |= OPT_SMOOTH
    if k.z_loss != 0.0:
        opts |= OPT_ZLOSS if k.ce_weight != 0.0 else OPT_ZLOSS | OPT_NO_CE
    cap = k.softcap_value
    xo = (s_mul, cap, float(k.logit_scale), 1.0 / cap if cap > 0.0 else 0.0, t_mul, k.teacher_softcap_value,
          1.0 - k.label_smoothing, float(k.smooth_per_class), float(k.z_loss))
    return opts & TRANSFORMS if transforms_only else opts, tuple(float(x) for x in xo)


@dataclass(frozen=True)
class VocabSplit:
    splits: int  # programs per row (1: the one-program-per-row kernel)
    chunk: int   # columns per split, a multiple of the block (the last split takes the rest)


def vocab_splits(n_rows: int, vocab_size: int, cfg: LaunchConfig,
                 split_override: Optional[int] = None) -> VocabSplit:
    """How many programs share each row's columns (the split path of dense.py).

    1 for the single-block path (the row lives in registers), when the rows alone reach
    SPLIT_PROGRAMS programs, or when a split would cover fewer than SPLIT_MIN_BLOCKS
    blocks. Otherwise enough splits for n_rows * splits >= SPLIT_PROGRAMS, within those
    bounds and MAX_SPLITS. ``split_override`` (tests) asks for that many splits, bounded
    by one block per split and MAX_SPLITS. The chunk is rounded up to whole blocks, so
    every split starts on a block (and a 16-byte granule: peeled rows keep one lead) and
    the count is then recomputed: every split holds at least one column below V.
    """
    if cfg.single_block or n_rows <= 0:
        return VocabSplit(1, vocab_size)
    blocks = triton.cdiv(vocab_size, cfg.block)
    if split_override is not None:
        want = min(int(split_override), blocks)
    elif n_rows >= SPLIT_PROGRAMS:
        want = 1
    else:
        want = min(triton.cdiv(SPLIT_PROGRAMS, n_rows), blocks // SPLIT_MIN_BLOCKS)
    want = min(want, MAX_SPLITS)
    if want < 2:
        return VocabSplit(1, vocab_size)
    chunk = triton.cdiv(blocks, want) * cfg.block
    splits = triton.cdiv(vocab_size, chunk)
    return VocabSplit(splits, chunk) if splits > 1 else VocabSplit(1, vocab_size)


def peel_columns(vocab_size: int, divergence: Optional[str], student: torch.Tensor, *others: torch.Tensor) -> int:
    """Columns per 16-byte period by which the multi-block sweeps peel each row's
    misaligned head (rows.py: peeled rows), or 0 for the plain masked loop.

    ``others``: the teacher (and the gradient), read (and written) at the student's
    columns; ``divergence``: the forward kernel's (None: the row_stats kernel). 0 where
    the JIT already proves the student's and teacher's rows 16-byte aligned (pointers on
    16 bytes, row strides and V multiples of 16: V = 32000, 128256), so the plain loop
    loads vectors; 0 where no one lead aligns every tensor (a teacher or gradient whose
    row stride differs from the student's by a non-multiple of a vector: each tensor
    would need its own lead); 0 where ``peel_elements`` says so. Otherwise 16 bytes of
    the narrowest dtype: the student's lead modulo it, (base + row * stride) mod PEEL,
    then aligns every tensor in every row.
    """
    read = (student,) + others[:1]
    if all(x.data_ptr() % VECTOR_BYTES == 0 and x.stride(0) % 16 == 0 for x in read) and vocab_size % 16 == 0:
        return 0
    peel = peel_elements(divergence, student.element_size(), *(x.element_size() for x in others))
    if not peel:
        return 0
    for x in others:
        vec = VECTOR_BYTES // x.element_size()
        if x.data_ptr() % x.element_size() or (base_lead(x, peel) - base_lead(student, peel)) % vec or \
                (x.stride(0) - student.stride(0)) % vec:
            return 0
    return peel


# fp32 pairs (8 values per thread and tensor, two 16-byte loads each) peel where that
# compiles without spilling for sm_90 under both ptxas (.ci/triton_sm90_check.py): the
# peeled reverse_kl and tvd sweeps spill 4 bytes at the 64 registers the CUDA toolkit's
# ptxas aims at, while forward_kl's plain loop at odd V spills 4 bytes and its peeled
# one does not.
PEEL_FP32 = {"forward_kl": True, "reverse_kl": False, "jsd": True, "tvd": False, None: True}


def peel_elements(divergence: Optional[str], *element_sizes: int) -> int:
    """The peel period of tensors of these element sizes: elements of the narrowest dtype
    in 16 bytes (8 for 16-bit data), or 0 (no peel) for fp32 pairs where PEEL_FP32 says so."""
    narrowest = min(element_sizes)
    if narrowest >= 4 and not PEEL_FP32[divergence]:
        return 0
    return VECTOR_BYTES // narrowest


def base_lead(x: torch.Tensor, peel: int) -> int:
    """Elements by which ``x``'s first row starts past a ``peel``-element boundary (0 without a peel)."""
    return (x.data_ptr() // x.element_size()) % peel if peel else 0


def warps_for(block: int) -> int:
    """Warps for a block: 8 columns per thread, 4 to 32 warps."""
    return max(4, min(32, block // 256))


def _config_probe_vocab_sizes() -> Iterator[int]:
    """Vocabulary sizes that reach every configuration launch_config can return."""
    v = 1
    while v <= 4 * MAX_BLOCK:
        yield v
        v *= 2
    yield 128256  # and a realistic LLM vocabulary
    yield 50257   # odd: rows not on 16 bytes, the peeled multi-block sweeps


def peeled_variant(cfg: LaunchConfig, vocab: int) -> bool:
    """Whether contiguous rows of ``vocab`` columns take the peeled sweeps (peel_columns):
    multi block, and a vocabulary the JIT cannot prove a multiple of 16."""
    return not cfg.single_block and vocab % 16 != 0


def config_classes(options: bool = False, stats: bool = False):
    """The distinct kernel configurations the launcher can pick, a worst case of each class
    (``options``: with a logit option on, ``stats``: with the diagnostics, as ``launch_config``
    takes them).

    A class is (divergence, path, num_warps, peeled); its worst case for registers is its
    largest block, and the smallest block of a class (tiny vocabularies: fewer columns
    than threads) is listed too when it differs. The multi-block classes come twice: at a
    vocabulary on 16 bytes (the plain sweeps) and at an odd one (the peeled sweeps,
    ``peeled_variant``). Returns [(divergence, LaunchConfig, vocab)], used by the sm_90
    compile check so that it follows this function, not a copied list.
    """
    largest, smallest = {}, {}
    for divergence in SINGLE_BLOCK_MAX:  # every divergence
        for v in _config_probe_vocab_sizes():
            cfg = launch_config(v, torch.bfloat16, torch.bfloat16, divergence, options=options, stats=stats)
            key = (divergence, cfg.single_block, cfg.num_warps, peeled_variant(cfg, v))
            if key not in largest or cfg.block > largest[key][1].block:
                largest[key] = (divergence, cfg, v)
            if key not in smallest or cfg.block < smallest[key][1].block:
                smallest[key] = (divergence, cfg, v)
    out = list(largest.values())
    out += [entry for key, entry in smallest.items() if entry[1] != largest[key][1]]
    return out


def split_config_classes(options: bool = False, stats: bool = False):
    """The configurations of the vocabulary-split kernels (split.py): the multi-block
    classes of :func:`config_classes`, the only ones :func:`vocab_splits` splits. Its
    passes run the forward kernel's sweeps at the same block, warps and peel."""
    return [entry for entry in config_classes(options, stats) if not entry[1].single_block]


def device_guard(device: torch.device):
    """The guard a launch runs under: the tensors' CUDA device made current. Triton launches
    on the current device and its stream, so tensors on cuda:1 while cuda:0 is current
    (model parallel, ``device_map``, no ``set_device``) would run on GPU 0 with GPU 1
    pointers. Nothing for CPU tensors (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@contextlib.contextmanager
def kernel_launch(device: torch.device):
    """What every launcher runs its kernels under: the device guard of the tensors'
    ``device`` (looked up here at each call, so a test can wrap it) and ``quiet_numpy``."""
    with device_guard(device), quiet_numpy():
        yield


def quiet_numpy():
    """Under the interpreter, numpy warns on the IEEE special values the kernels rely on
    (log2(0) = -inf, -inf - -inf = NaN behind a select, fp16 overflow to inf); the GPU
    does not, neither do we."""
    if not kernels_interpreted():
        return contextlib.nullcontext()
    import numpy as np

    return np.errstate(all="ignore")
