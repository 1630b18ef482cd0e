"""CI compiles every CUDA source for sm_90a and sm_80 (compile only: CI has nvcc, no GPU).

sm_90a is assembled to SASS (its register and spill table is printed); sm_80 is compiled to
PTX only, which runs the whole front end for that architecture (its #if branches, its
template instances) and skips its ptxas. FASTKD_BUILD_MATRIX=1 (the slow checks' switch, .ci/run) assembles sm_80 too.
"""
import glob
import os
import re
import shutil
import sys

import pytest

from harness import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI_GENCODE = "-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=compute_80"


CU_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
GLUE_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))) + ["ops.cpp"]


def test_every_cuda_source_is_checked():
    assert {"kd_cluster.cu", "kd_twopass.cu", "kd_scale_grad.cu", "kd_sparse.cu", "kd_multi.cu"} <= set(CU_FILES)
    assert "kd_cuda.cpp" in GLUE_FILES


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("what", CU_FILES + ["glue"])
def test_cuda_sources_compile_for_sm90a_and_sm80(what):
    """One .cu file (or the host-compiler glue) per test, so that pytest-xdist's workers
    share the check."""
    env = dict(os.environ, PYTHON=sys.executable)
    if os.environ.get("FASTKD_BUILD_MATRIX", "0") != "1" and "FASTKD_CI_GENCODE" not in os.environ:
        env["FASTKD_CI_GENCODE"] = CI_GENCODE
    proc = processes.run(["bash", os.path.join(ROOT, ".ci", "compile_cuda.sh"), what], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=780)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in (GLUE_FILES if what == "glue" else [what]):
        assert re.search(rf"^ok .*\b{re.escape(name)}\b", proc.stdout, re.M), name


def test_compile_script_refuses_an_unknown_file():
    proc = processes.run(["bash", os.path.join(ROOT, ".ci", "compile_cuda.sh"), "no_such_file.cu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no csrc/cuda/no_such_file.cu" in proc.stderr
