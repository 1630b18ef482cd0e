"""Loading fastkd._C: nothing is built or imported at `import fastkd`; a failed JIT build
says why (the compiler's own error and the log's path)."""
import os
import subprocess
import sys

import pytest

from fastkd import _ext


def test_import_builds_and_imports_nothing():
    code = ("import sys, fastkd, fastkd._ext as e; "
            "assert e.load_extension.cache_info().currsize == 0, 'extension loaded at import'; "
            "assert 'triton' not in sys.modules, 'triton imported at import'; "
            "assert 'fastkd._C' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "FASTKD_NO_JIT": "1"})


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
    from fastkd import _build

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

    if fastkd.ops.get_backend("cpu") is None:
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
