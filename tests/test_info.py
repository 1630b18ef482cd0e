"""`python -m fastkd.info` reports what can run, with and without the compiled extension and Triton."""
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from harness import processes

ROOT = Path(__file__).resolve().parents[1]


# An editable install (pip install -e) maps fastkd._C to the checkout's build whatever
# fastkd package is imported; the unbuilt copies must not see it.
NO_EDITABLE_FINDER = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
                      "if '__editable__' not in getattr(f, '__module__', '')]; ")


def run_info(*args, env=None, cwd=None, prelude=""):
    code = prelude + "import runpy, sys; sys.argv = ['fastkd.info'] + %r; runpy.run_module('fastkd.info', run_name='__main__')" % (list(args),)
    full_env = {k: v for k, v in os.environ.items() if k not in ("FASTKD_BACKEND", "FASTKD_NO_JIT", "TRITON_INTERPRET")}
    full_env.update(env or {})
    done = processes.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                         cwd=cwd or ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def unbuilt_copy(tmp_path_factory):
    """fastkd and csrc copied without any compiled extension, as an unbuilt source tree is."""
    root = tmp_path_factory.mktemp("unbuilt")
    ignore = shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__")
    shutil.copytree(ROOT / "fastkd", root / "fastkd", ignore=ignore)
    shutil.copytree(ROOT / "csrc", root / "csrc", ignore=ignore)
    return root


def line(out, key):
    found = [ln for ln in out.splitlines() if ln.strip().startswith(key + ":")]
    assert found, f"no {key!r} line in:\n{out}"
    return found[0].split(":", 1)[1].strip()


def test_info_with_the_extension():
    pytest.importorskip("fastkd._C", reason="needs the compiled extension (pip install builds it)")
    out = run_info()
    assert line(out, "torch") == torch.__version__
    assert line(out, "source").startswith("prebuilt")
    assert line(out, "built_with_torch") == torch.__version__
    assert line(out, "cpu_isa") in ("avx512", "avx2", "avx", "sse2", "neon", "scalar")
    assert line(out, "cpu").startswith("available")  # backends: cpu
    picks = out.split("auto picks:")[1]
    assert line(picks, "cpu") == "cpu"


def test_info_without_extension_never_builds(unbuilt_copy, tmp_path):
    build_dir = tmp_path / "jit"
    out = run_info(env={"PYTHONPATH": str(unbuilt_copy), "FASTKD_BUILD_DIR": str(build_dir)}, cwd=unbuilt_copy,
                   prelude=NO_EDITABLE_FINDER)
    assert line(out, "fastkd").endswith(f"({unbuilt_copy / 'fastkd'})")
    assert "no prebuilt extension" in out and "JIT-builds it into" in out
    assert "--build" in out
    assert line(out, "cpu").startswith("unavailable")
    assert line(out.split("auto picks:")[1], "cpu") == "cpu once fastkd._C is built, torch until then"
    assert not list(build_dir.glob("**/*.so")), "fastkd.info started a build without --build"


def test_info_without_extension_or_triton(unbuilt_copy):
    out = run_info(env={"PYTHONPATH": str(unbuilt_copy), "FASTKD_NO_JIT": "1"}, cwd=unbuilt_copy,
                   prelude=NO_EDITABLE_FINDER + "sys.modules['triton'] = None; ")
    assert line(out, "triton") == "not installed"
    assert "FASTKD_NO_JIT=1 forbids the JIT build" in out
    backends = out.split("backends:")[1].split("auto picks:")[0]
    assert line(backends, "triton") == "unavailable: triton is not installed"
    assert line(backends, "torch").startswith("available")
    assert line(out.split("auto picks:")[1], "cpu") == "torch (fastkd._C unavailable)"


def test_info_reports_the_triton_it_finds():
    triton = pytest.importorskip("triton")
    out = run_info()
    assert line(out, "triton") == triton.__version__
    backends = out.split("backends:")[1].split("auto picks:")[0]
    assert line(backends, "triton").startswith("available on CUDA tensors")


def test_a_prebuilt_extension_that_does_not_load_says_why(unbuilt_copy, tmp_path):
    # A _C built against another torch fails at import; the warning and the report must carry
    # the import error instead of calling it "no compiled extension".
    broken = tmp_path / "broken"
    shutil.copytree(unbuilt_copy, broken)
    import sysconfig
    (broken / "fastkd" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))).write_bytes(b"not a shared object")
    env = {"PYTHONPATH": str(broken), "FASTKD_NO_JIT": "1"}
    out = run_info(env=env, cwd=broken, prelude=NO_EDITABLE_FINDER)
    assert "does not load" in line(out, "problem")
    code = NO_EDITABLE_FINDER + ("import warnings, torch, fastkd\n"
                                 "with warnings.catch_warnings(record=True) as w:\n"
                                 "    warnings.simplefilter('always')\n"
                                 "    fastkd.kd_loss(torch.randn(2, 5), torch.randn(2, 5))\n"
                                 "print('|'.join(str(x.message) for x in w))")
    full_env = {k: v for k, v in os.environ.items() if k not in ("FASTKD_BACKEND", "TRITON_INTERPRET")}
    full_env.update(env)
    done = processes.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=broken,
                         timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "does not load" in done.stdout and "FASTKD_NO_JIT=1" in done.stdout, done.stdout


def test_backends_list_the_losses_their_kernels_run():
    from fastkd import _dispatch, info

    status = info.backend_status(extension_loaded=True)
    if _dispatch.get_backend("cpu") is None:
        pytest.skip("fastkd._C is not available here")
    assert status["cpu"] == "available on CPU tensors (dense, sparse, vocab-parallel)"
    assert "sparse" in status["torch"] and "vocab-parallel" in status["torch"]
