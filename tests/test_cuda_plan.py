"""The CUDA launch decisions, checked on the CPU.

``csrc/cuda/kd_cuda.h`` makes every launch decision (kernel, pack width, each tensor's
part width, threads, cluster size, the gradient's layout) in plain C++. This file compiles
a small driver against it with g++ (only the CUDA headers are needed, no GPU, no CUDA
library) and checks the plans for the layouts that used to lose vectorised loads, and the
rules of a forced kernel. The forward launch and ``torch.ops.fastkd.cuda_kernel_plan``
both decide through ``choose_plan`` (kd_cuda.cpp: make_plan), so what holds here holds for
them; tests/test_cuda.py asserts on a GPU that the planned kernel is the one that ran.
"""
import os
import shutil

import pytest

from harness import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_INCLUDES = [p for p in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda")
                 if p and os.path.isfile(os.path.join(p, "include", "cuda_runtime.h"))]

pytestmark = [
    pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="needs g++"),
    pytest.mark.skipif(not CUDA_INCLUDES, reason="needs the CUDA headers (cuda_runtime.h)"),
]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("cuda_plan") / "cuda_plan_driver")
    cmd = [os.environ.get("CXX", "g++"), "-std=c++17", "-O0", "-Wall", "-Werror",
           "-I", os.path.join(ROOT, "csrc"), "-I", os.path.join(CUDA_INCLUDES[0], "include"),
           os.path.join(ROOT, "tests", "cpp", "cuda_plan_driver.cpp"), "-o", exe]
    proc = processes.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def plan(driver, **query):
    """The plan for one described call: a dict of the driver's fields."""
    line = " ".join(f"{k}={v}" for k, v in query.items())
    out = processes.run([driver], input=line + "\n", capture_output=True, text=True, timeout=60, check=True).stdout
    head, refused = out.strip().split(" refused=")
    fields = dict(w.split("=") for w in head.split())
    fields = {k: (v if k == "kind" else int(v)) for k, v in fields.items()}
    fields["refused"] = None if refused == "-" else refused
    return fields


# ---------------------------------------------------------------------------------------
# The gradient's layout (op_empty_grad): the student's offset modulo 16 bytes, and a row
# stride congruent to the student's, so it never forces narrower stores.

def test_gradient_of_a_contiguous_student_is_contiguous(driver):
    p = plan(driver, V=128256)
    assert (p["g_offset"], p["g_stride"]) == (0, 128256)
    p = plan(driver, V=50257, s_addr=2 * 3)  # a contiguous student 3 columns into its storage
    assert (p["g_offset"], p["g_stride"]) == (3, 50257)


@pytest.mark.parametrize("s_type,elem", [("bf16", 2), ("f16", 2), ("f32", 4)])
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("extra", [0, 1, 5, 47, 64])
def test_gradient_shares_the_students_alignment(driver, s_type, elem, offset, extra):
    v = 50257
    p = plan(driver, V=v, s_type=s_type, s_addr=offset * elem, s_stride=v + offset + extra)
    per16 = 16 // elem
    assert p["g_offset"] == offset % per16
    assert v <= p["g_stride"] < v + per16 and (p["g_stride"] - (v + offset + extra)) % per16 == 0
    assert p["g_part"] == p["vec"] == per16


# ---------------------------------------------------------------------------------------
# Layouts of issue 10 §1.4 that used to fall to one element per load (vec=1).

def test_student_sliced_from_a_wider_buffer(driver):
    """s = buf[:, :V] of a [N, V + pad] buffer, teacher alike: all packs whole, and the
    cluster kernel applies (the contiguous gradient of before disagreed on every row)."""
    p = plan(driver, V=50257, s_stride=50304, t_stride=50304)
    assert p["kind"] == "cluster" and p["vec"] == 8 and p["t_part"] == 8 and p["g_part"] == 8
    # With a contiguous teacher the relative offset changes by 47 columns a row: the teacher
    # alone is read a column at a time, the student and gradient still in 16-byte packs.
    p = plan(driver, V=50257, s_stride=50304)
    assert p["kind"] == "twopass" and p["vec"] == 8 and p["t_part"] == 1 and p["g_part"] == 8


def test_view_not_starting_on_16_bytes(driver):
    """s = buf[:, 3:3 + V]: the student's own lead keeps its packs aligned."""
    p = plan(driver, V=151936, s_addr=6, s_stride=151936 + 64, t_addr=6, t_stride=151936 + 64)
    assert p["kind"] == "cluster" and (p["vec"], p["t_part"], p["g_part"]) == (8, 8, 8)
    # The teacher aligned, the student 3 columns in: the teacher in parts of 1 column (3 is odd)...
    p = plan(driver, V=151936, s_addr=6, s_stride=151936 + 64, t_addr=0)
    assert p["kind"] == "twopass" and (p["vec"], p["t_part"], p["g_part"]) == (8, 1, 8)
    # ... and 2 columns in: parts of 2 (4-byte loads).
    p = plan(driver, V=151936, s_addr=4, s_stride=151936 + 64, t_addr=0, t_stride=151936 + 64)
    assert (p["vec"], p["t_part"], p["g_part"]) == (8, 2, 8)


@pytest.mark.parametrize("t_extra,t_part", [(0, 8), (1, 1), (2, 2), (4, 4), (6, 2), (8, 8), (12, 4)])
def test_teacher_stride_differing_by_a_non_multiple_of_8(driver, t_extra, t_part):
    p = plan(driver, V=32000, t_stride=32000 + t_extra)
    assert (p["vec"], p["t_part"], p["g_part"]) == (8, t_part, 8)
    assert p["kind"] == ("cluster" if t_part == 8 else "twopass")


def test_fp32_and_mixed_dtypes(driver):
    p = plan(driver, V=20001, s_type="f32", t_stride=20003)  # 4-column packs, teacher off by 2
    assert (p["vec"], p["t_part"], p["g_part"]) == (4, 2, 4)
    p = plan(driver, V=20001, s_type="bf16", t_type="f32", t_addr=8)  # packs of the wider dtype: 4 columns
    assert (p["kind"], p["vec"], p["t_part"], p["g_part"]) == ("twopass", 4, 2, 4)


def test_in_place_and_given_gradients(driver):
    p = plan(driver, V=50257, s_addr=2, s_stride=50304, t_addr=2, t_stride=50304, grad="inplace")
    assert p["kind"] == "cluster" and p["g_part"] == 8
    # A gradient of another layout (not one fastkd allocates) gets its own narrower parts.
    p = plan(driver, V=50257, s_stride=50304, t_stride=50304, grad=0, g_stride=50257)
    assert (p["kind"], p["t_part"], p["g_part"]) == ("twopass", 8, 1)
    # The row_stats kernel has no gradient.
    p = plan(driver, V=50257, grad="none", force="twopass")
    assert (p["kind"], p["g_part"]) == ("twopass", 8)


# ---------------------------------------------------------------------------------------
# Cluster sizes and the automatic choice.

@pytest.mark.parametrize("v,c", [(32000, 2), (128256, 8), (151936, 10), (262144, 16)])
def test_cluster_sizes(driver, v, c):
    p = plan(driver, V=v)
    assert (p["kind"], p["C"], p["threads"]) == ("cluster", c, 256)


def test_auto_falls_back_where_the_cluster_kernel_does_not_apply(driver):
    for query in (dict(stats=1), dict(t_type="f32"), dict(cluster_device=0), dict(launchable=0),
                  dict(t_stride=128257), dict(V=1000)):
        p = plan(driver, **dict(dict(V=128256), **query))
        assert p["kind"] == "twopass" and p["refused"] is None, (query, p)
    # A 16-CTA row that a misaligned student makes one pack longer needs 17 CTAs.
    p = plan(driver, V=262144, s_addr=2, t_addr=2)
    assert p["kind"] == "twopass" and p["refused"] is None


def test_launchability_is_asked_only_for_a_cluster_plan(driver):
    assert plan(driver, V=128256)["asked"] == 1
    assert plan(driver, V=128256, stats=1)["asked"] == 0
    assert plan(driver, V=128256, force="twopass")["asked"] == 0


# ---------------------------------------------------------------------------------------
# A forced kernel (FASTKD_CUDA_KERNEL): cluster runs the cluster kernel or is refused
# (kd_cuda.cpp raises with the reason), never the two-pass kernel in its place.

@pytest.mark.parametrize("query,why", [
    (dict(stats=1), "row statistics"),
    (dict(t_type="f32"), "dtypes differ"),
    (dict(cluster_device=0), "not sm_90"),
    (dict(launchable=0), "co-schedule"),
    (dict(t_stride=128260), "teacher"),
    (dict(grad=0, g_stride=128257), "gradient"),
    (dict(V=262144, s_addr=2, t_addr=2), "more than 16 CTAs"),
])
def test_forced_cluster_that_cannot_run_is_refused(driver, query, why):
    p = plan(driver, **dict(dict(V=128256, force="cluster"), **query))
    assert p["refused"] is not None and why in p["refused"], p


def test_forced_cluster_runs_short_rows(driver):
    p = plan(driver, V=1000, force="cluster")
    assert (p["kind"], p["C"], p["refused"]) == ("cluster", 1, None)


def test_forced_twopass(driver):
    p = plan(driver, V=128256, force="twopass")
    assert (p["kind"], p["refused"]) == ("twopass", None)


# ---------------------------------------------------------------------------------------
# Several teachers (plan_multi, kd_multi.cu): the two-pass grid, every teacher in the
# narrowest part any of them needs, threads up to kMultiMaxThreads.

def test_multi_plan(driver):
    p = plan(driver, V=128256, multi=1)
    assert (p["kind"], p["vec"], p["t_part"], p["g_part"], p["threads"]) == ("multi", 8, 8, 8, 256)
    assert plan(driver, V=1000, multi=1)["threads"] == 64
    # A second teacher whose stride differs from the student's by 2 columns: both in parts of 2.
    p = plan(driver, V=32000, multi=1, t1_stride=32002)
    assert (p["vec"], p["t_part"], p["g_part"]) == (8, 2, 8)
    p = plan(driver, V=32000, multi=1, s_type="f32", t_type="bf16")
    assert (p["vec"], p["t_part"], p["built"]) == (4, 4, 1)


@pytest.mark.parametrize("s_type,t_type,built", [
    ("bf16", "bf16", 1), ("f16", "f16", 1), ("f32", "f32", 1), ("bf16", "f32", 1), ("f16", "f32", 1),
    ("f32", "bf16", 1), ("f32", "f16", 0), ("bf16", "f16", 0), ("f16", "bf16", 0)])
def test_multi_teacher_dtype_pairs_built(driver, s_type, t_type, built):
    """The pairs kd_multi.cu is built for; the others are converted to float32 first (kd_cuda.cpp)."""
    assert plan(driver, V=4096, multi=1, s_type=s_type, t_type=t_type)["built"] == built
