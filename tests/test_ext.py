"""Loading fastkd._C: nothing is built or imported at `import fastkd`; a failed JIT build
says why (the compiler's own error and the log's path)."""
import os
import sys

import pytest

from fastkd.backends import cpp as _ext

from harness import processes


def test_import_builds_and_imports_nothing():
    code = ("import sys, fastkd, fastkd.backends.cpp as e; "
            "assert e.load_extension.cache_info().currsize == 0, 'extension loaded at import'; "
            "assert 'triton' not in sys.modules, 'triton imported at import'; "
            "assert 'fastkd._C' not in sys.modules")
    processes.run([sys.executable, "-c", code], check=True, env={**os.environ, "FASTKD_NO_JIT": "1"}, timeout=300)


def test_import_without_extension_is_fast_and_builds_nothing(tmp_path):
    """A copy of the package without fastkd._C: `import fastkd` must not start the JIT
    build, import Triton, or take more than 2 s beyond torch's own import."""
    import shutil
    from pathlib import Path

    src = Path(_ext.__file__).resolve().parents[1]
    shutil.copytree(src, tmp_path / "fastkd", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    build_dir = tmp_path / "build"
    code = ("import sys, time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); "
            "import fastkd; t2 = time.perf_counter(); "
            f"assert fastkd.__file__.startswith({str(tmp_path)!r}), fastkd.__file__; "
            "assert 'triton' not in sys.modules and 'fastkd._C' not in sys.modules; "
            "print(t2 - t1)")
    out = processes.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                        env={**os.environ, "FASTKD_BUILD_DIR": str(build_dir), "PYTHONPATH": str(tmp_path)}, timeout=300)
    assert float(out.stdout) < 2.0, out.stdout
    assert not build_dir.exists() or not any(build_dir.iterdir()), "import fastkd started a build"
    assert "compiling" not in out.stderr


def test_compiler_errors_are_extracted():
    log = ("Error building extension 'fastkd_C': [1/2] c++ -MMD -MF kd_cpu.o.d -DTORCH_EXTENSION_NAME=fastkd_C "
           "-O3 -c /src/csrc/cpu/kd_cpu.cpp -o kd_cpu.o\n"
           "FAILED: kd_cpu.o\n"
           "/src/csrc/cpu/kd_cpu.cpp:12:3: error: 'undefined_thing' was not declared in this scope\n"
           "   12 |   undefined_thing();\n"
           "ninja: build stopped: subcommand failed.\n")
    assert _ext.compiler_errors(log) == [
        "/src/csrc/cpu/kd_cpu.cpp:12:3: error: 'undefined_thing' was not declared in this scope"]


def test_failed_build_reports_the_compiler_error(tmp_path, monkeypatch):
    pytest.importorskip("ninja")
    broken = tmp_path / "broken.cpp"
    broken.write_text("int f() { return undefined_thing_xyz(); }\n")
    from fastkd.backends import cpp_build as _build

    monkeypatch.setattr(_build, "cpu_sources", lambda: [str(broken)])
    monkeypatch.setattr(_build, "want_cuda", lambda: False)
    monkeypatch.setenv("FASTKD_BUILD_DIR", str(tmp_path / "build"))
    with pytest.raises(RuntimeError) as info:
        _ext._jit_build()
    msg = str(info.value)
    assert "undefined_thing_xyz" in msg and "error" in msg
    assert "build_error.log" in msg and (tmp_path / "build" / "build_error.log").exists()


def test_cpu_grad_cache_reuses_and_empties():
    import torch

    import fastkd

    if fastkd._dispatch.get_backend("cpu") is None:
        pytest.skip("fastkd._C not available")
    ext = _ext.load_extension()
    fastkd.empty_cpu_grad_cache()
    s = torch.randn(64, 32768, requires_grad=True)  # an 8 MiB gradient: cached
    t = torch.randn(64, 32768)
    fastkd.kd_loss(s, t).backward()
    first = s.grad.data_ptr()
    want = s.grad.clone()
    s.grad = None
    assert ext.cpu_grad_cache_bytes() >= 8 << 20
    fastkd.kd_loss(s, t).backward()
    assert s.grad.data_ptr() == first  # the freed buffer came back
    torch.testing.assert_close(s.grad, want)
    s.grad = None
    assert fastkd.empty_cpu_grad_cache() >= 8 << 20
    assert ext.cpu_grad_cache_bytes() == 0
