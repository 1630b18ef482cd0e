"""CI compiles every CUDA source for sm_90a and sm_80 (compile only: CI has nvcc, no GPU).

sm_90a is assembled to SASS (its register and spill table is printed); sm_80 is compiled to
PTX only, which runs the whole front end for that architecture (its #if branches, its
template instances) and skips its ptxas, a third of the check's time on the 2-core CI
machine. FASTKD_BUILD_MATRIX=1 (the slow checks' switch, .ci/run) assembles sm_80 too.
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI_GENCODE = "-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=compute_80"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed on this machine")
def test_cuda_sources_compile_for_sm90a_and_sm80():
    env = dict(os.environ, PYTHON=sys.executable)
    if os.environ.get("FASTKD_BUILD_MATRIX", "0") != "1" and "FASTKD_CI_GENCODE" not in os.environ:
        env["FASTKD_CI_GENCODE"] = CI_GENCODE
    proc = subprocess.run(["bash", os.path.join(ROOT, ".ci", "compile_cuda.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("kd_cluster.cu", "kd_twopass.cu", "kd_scale_grad.cu", "kd_sparse.cu", "kd_multi.cu", "kd_cuda.cpp"):
        assert name in proc.stdout
