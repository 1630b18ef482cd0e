"""The build flags leave the C++ standard to torch (issue 8): torch.utils.cpp_extension
adds the -std its headers need only when the flags name none. The CUDA build environment
(issue 10): the arch list against nvcc, torch's CUDA major against nvcc's, and the
cuda backend's run-time check of the code fastkd._C has for a device."""
import os
import platform
import re
import shutil
import subprocess

import pytest

from fastkd.backends import cpp_build as _build

from harness import processes


@pytest.mark.parametrize("flags", ["cxx", "nvcc"])
def test_no_cxx_standard_is_hard_coded(flags):
    chosen = _build.cxx_flags() if flags == "cxx" else _build.nvcc_flags()
    assert not [f for f in chosen if re.match(r"(-|--|/)std[=:]", f)], chosen


@pytest.mark.skipif(shutil.which("g++") is None or platform.machine() != "x86_64", reason="needs g++ on x86-64")
def test_loops_get_512_bit_vectors_on_an_intel_avx512_target(tmp_path):
    """GCC tunes Intel's AVX-512 cores for 256-bit vectors: with the build's flags, a row
    loop compiled for an Intel Xeon (-march=icelake-server) must still use zmm registers."""
    src = tmp_path / "loop.cpp"
    src.write_text("void axpy(float* __restrict y, const float* __restrict x, float a, long n) {\n"
                   "#pragma omp simd\n  for (long i = 0; i < n; ++i) y[i] += a * x[i];\n}\n")
    flags = [f for f in _build.cxx_flags() if not f.startswith(("-march", "-D"))] + ["-march=icelake-server"]
    asm = processes.run(["g++", *flags, "-S", "-o", "-", str(src)], capture_output=True, text=True, check=True, timeout=300).stdout
    assert "zmm" in asm


def test_torch_std_flag_meets_what_aten_requires():
    from torch.utils.cpp_extension import include_paths

    flag = _build.torch_std_flag()
    std = int(re.fullmatch(r"-std=c\+\+(\d+)", flag).group(1))
    assert std >= 17
    header = next(os.path.join(p, "ATen", "ATen.h") for p in include_paths()
                  if os.path.isfile(os.path.join(p, "ATen", "ATen.h")))
    with open(header, encoding="utf-8", errors="replace") as f:
        required = re.search(r"C\+\+(\d+) or later", f.read())
    if required:
        assert std >= int(required.group(1))


# ---------------------------------------------------------------------------------------
# The CUDA build environment (issue 10 §1.5): TORCH_CUDA_ARCH_LIST checked against the nvcc
# that builds, torch's CUDA major against nvcc's, and a run-time warning when fastkd._C has
# no (cluster) code for the device. nvcc and torch.version.cuda are faked: no GPU needed.

import types  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

from fastkd.backends import cpp as _ext  # noqa: E402

NGC_LIST = "5.2 6.0 6.1 7.0 7.5 8.0 8.6 9.0+PTX"
NVCC_13 = ("13.0", [75, 80, 86, 87, 88, 89, 90, 100, 110, 103, 120, 121])
NVCC_12 = ("12.8", [50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90, 100, 101, 120])


@pytest.fixture
def fake_nvcc(monkeypatch):
    """Installs a fake nvcc (release, SM list); returns the list of the argument tuples it was run with."""
    calls = []

    def install(release, sms, list_gpu_code=True):
        def run(nvcc, *args):
            calls.append(args)
            if args == ("--version",):
                return (f"nvcc: NVIDIA (R) Cuda compiler driver\n"
                        f"Cuda compilation tools, release {release}, V{release}.1\n")
            if args == ("--list-gpu-code",) and list_gpu_code:
                return "".join(f"sm_{n}\n" for n in sms)
            raise subprocess.CalledProcessError(1, [nvcc, *args])

        monkeypatch.setattr(_build, "run_nvcc", run)
        _build.nvcc_info.cache_clear()
        return calls

    monkeypatch.setattr(_build, "nvcc_path", lambda: "/fake/cuda/bin/nvcc")
    monkeypatch.setattr(_build, "cuda_headers_problem", lambda: None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    for var in ("TORCH_CUDA_ARCH_LIST", "FASTKD_BUILD_CUDA"):
        monkeypatch.delenv(var, raising=False)
    yield install
    _build.nvcc_info.cache_clear()


REAL_CUDA_HEADERS_PROBLEM = _build.cuda_headers_problem  # the fixture fakes it


def no_warnings(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args)


def test_default_arch_list_is_accepted(fake_nvcc):
    fake_nvcc(*NVCC_13)
    assert no_warnings(_build.cuda_arch_list) == ["8.0", "9.0a"]
    flags = no_warnings(_build.nvcc_flags)
    # The arch list reaches ops.cpp through the host compiler only: nvcc splits a -D
    # value at its commas ("-D9.0a": "macro names must be identifiers").
    assert "-DFASTKD_CUDA_ARCHS=8.0,9.0a" in _build.cuda_cxx_flags(["8.0", "9.0a"])
    assert not any(f.startswith("-DFASTKD_CUDA_ARCHS") for f in flags)
    assert [f for f in flags if f.startswith("-gencode")] == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
    assert no_warnings(_build.want_cuda) is True


def test_unsupported_entries_are_dropped_and_named(fake_nvcc, monkeypatch):
    fake_nvcc(*NVCC_13)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", NGC_LIST)
    with pytest.warns(_build.CudaBuildWarning, match=r"entries 5\.2, 6\.0, 6\.1, 7\.0 dropped") as record:
        archs = _build.cuda_arch_list()
    assert archs == ["7.5", "8.0", "8.6", "9.0+PTX"]
    assert len(record) == 1  # 9.0 is kept: no cluster warning
    assert _build.cuda_gencode_flags(archs)[-2:] == [
        "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]
    assert _build.cuda_cxx_flags(archs) == ["-DFASTKD_WITH_CUDA", "-DFASTKD_CUDA_ARCHS=7.5,8.0,8.6,9.0+PTX"]


def test_the_same_list_passes_an_nvcc_that_supports_it(fake_nvcc, monkeypatch):
    fake_nvcc(*NVCC_12)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", NGC_LIST)
    assert no_warnings(_build.cuda_arch_list) == NGC_LIST.split()


@pytest.mark.parametrize("arch_list", ["5.2;6.0;6.1", "3.5 5.0"])
def test_nothing_left_is_an_error_saying_what_to_set(fake_nvcc, monkeypatch, arch_list):
    fake_nvcc(*NVCC_13)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    with pytest.raises(ValueError, match=r"no architecture that /fake/cuda/bin/nvcc supports .*7\.5.*"
                                         r"set TORCH_CUDA_ARCH_LIST.*FASTKD_BUILD_CUDA=0"):
        _build.nvcc_flags()


@pytest.mark.parametrize("entry", ["Hopper", "sm_90", "9", "9.0b", "9.0+ptx"])
def test_an_entry_that_does_not_parse_is_an_error(fake_nvcc, monkeypatch, entry):
    fake_nvcc(*NVCC_13)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", f"8.0;{entry}")
    with pytest.raises(ValueError, match=re.escape(repr(entry))):
        _build.cuda_arch_list()


@pytest.mark.parametrize("arch_list,warns", [("8.0;8.6", True), ("8.0+PTX", True), ("8.0;9.0", False),
                                             ("8.0;10.0", False), ("9.0a", False)])
def test_a_list_without_9_0_warns_of_no_cluster_kernel(fake_nvcc, monkeypatch, arch_list, warns):
    fake_nvcc(*NVCC_13)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    if warns:
        with pytest.warns(_build.CudaBuildWarning, match=r"no 9\.0 .*no cluster kernel.*add 9\.0a"):
            _build.cuda_arch_list()
    else:
        no_warnings(_build.cuda_arch_list)


def test_nvcc_is_asked_once(fake_nvcc, monkeypatch):
    calls = fake_nvcc(*NVCC_13)
    for arch_list in ("8.0;9.0a", "8.6;9.0a", NGC_LIST):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _build.nvcc_flags()
            _build.want_cuda()
    assert sorted(calls) == [("--list-gpu-code",), ("--version",)]


def test_an_nvcc_that_cannot_list_its_architectures_takes_the_list_as_given(fake_nvcc, monkeypatch):
    fake_nvcc("13.0", [], list_gpu_code=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "5.2;9.0a")
    assert no_warnings(_build.cuda_arch_list) == ["5.2", "9.0a"]


def test_torch_and_nvcc_major_mismatch_skips_the_cuda_build(fake_nvcc, monkeypatch):
    fake_nvcc(*NVCC_13)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.warns(_build.CudaBuildWarning, match=r"without its CUDA kernels.*CUDA 12\.8.*CUDA 13\.0.*CUDA_HOME"):
        assert _build.want_cuda() is False
    assert "CUDA 12.8" in _build.cuda_skip_reason()
    monkeypatch.setenv("FASTKD_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match=r"FASTKD_BUILD_CUDA=1.*CUDA 12\.8.*CUDA 13\.0"):
        _build.want_cuda()
    monkeypatch.setenv("FASTKD_BUILD_CUDA", "0")
    assert no_warnings(_build.want_cuda) is False


def test_missing_cuda_headers_skip_the_cuda_build_with_a_warning(fake_nvcc, monkeypatch, tmp_path):
    # nvcc on PATH through a wrapper (/usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc)
    # makes torch take CUDA_HOME=/usr/local, where no cuda_runtime.h is: the build used to go
    # ahead and fail inside ninja ("fatal error: cuda_runtime.h: No such file or directory").
    import torch.utils.cpp_extension as cpp_extension

    fake_nvcc(*NVCC_13)
    monkeypatch.setattr(_build, "cuda_headers_problem", REAL_CUDA_HEADERS_PROBLEM)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    with pytest.warns(_build.CudaBuildWarning, match=r"without its CUDA kernels.*has no include/cuda_runtime\.h"):
        assert _build.want_cuda() is False
    monkeypatch.setenv("FASTKD_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="FASTKD_BUILD_CUDA=1.*cuda_runtime"):
        _build.want_cuda()
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    assert _build.want_cuda() is True


def test_a_minor_difference_builds(fake_nvcc, monkeypatch):
    fake_nvcc("13.2", NVCC_13[1])
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert no_warnings(_build.want_cuda) is True


def test_no_cuda_torch_or_no_nvcc_builds_the_cpu_kernel_quietly_unless_forced(fake_nvcc, monkeypatch):
    fake_nvcc(*NVCC_13)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert no_warnings(_build.want_cuda) is False
    monkeypatch.setattr(_build, "nvcc_path", lambda: None)  # a CUDA torch from pip, no toolkit: usual
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert no_warnings(_build.want_cuda) is False
    assert "nvcc was found neither" in _build.cuda_skip_reason()
    monkeypatch.setenv("FASTKD_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="FASTKD_BUILD_CUDA=1.*nvcc was found neither"):
        _build.want_cuda()


# Run time: which code of fastkd._C a device runs.

@pytest.mark.parametrize("capability,archs,problem", [
    ((9, 0), "8.0,9.0a", None),
    ((9, 0), "9.0", None),
    ((8, 6), "8.0,9.0a", None),            # sm_80 SASS runs on 8.6
    ((8, 9), "8.0,8.6", None),
    ((9, 0), "8.0", "no code"),            # SASS runs only within its major
    ((9, 0), "8.0,8.6+PTX", "no cluster kernel"),  # runs from PTX, compiled at load
    ((10, 0), "8.0+PTX", "no cluster kernel"),
    ((10, 0), "8.0,9.0+PTX", None),        # compute_90 PTX has the cluster kernel
    ((10, 0), "8.0,9.0a", "no code"),      # the default list on Blackwell: 9.0a runs only on 9.0
    ((10, 3), "10.0f", None),
    ((12, 0), "10.0f", "no code"),         # family code stays within its major
    ((8, 0), "9.0a+PTX", "no code"),
    ((7, 5), "8.0", "no code"),
])
def test_device_code_problem(capability, archs, problem):
    found = _ext.device_code_problem(capability, archs)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found, found
        assert archs.replace(",", ";") in found and f"sm_{capability[0]}{capability[1]}" in found


@pytest.fixture
def fake_device(monkeypatch):
    """fastkd._C built for the given arch list, on fake devices of the given capabilities."""
    def install(archs, capabilities):
        monkeypatch.setattr(_ext, "load_extension", lambda: types.SimpleNamespace(with_cuda=True, cuda_archs=archs))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capabilities[index])
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        _ext._check_device_code.cache_clear()

    yield install
    _ext._check_device_code.cache_clear()


def test_sm90_device_without_sm90_code_warns_once(fake_device):
    fake_device("8.0,8.6+PTX", {0: (9, 0), 1: (8, 6)})
    with pytest.warns(RuntimeWarning, match=r"cuda:0: fastkd\._C was built for 8\.0;8\.6\+PTX, without sm_90 "
                                            r"code: on this sm_90 device .* no cluster kernel") as record:
        assert _ext._runs_on_cuda(torch.device("cuda", 0))
        assert _ext._runs_on_cuda(torch.device("cuda"))  # the current device: 0, already warned
        assert _ext._runs_on_cuda(torch.device("cuda", 0))
    assert len(record) == 1
    assert no_warnings(_ext._runs_on_cuda, torch.device("cuda", 1))  # sm_86 runs sm_86 code
    assert no_warnings(_ext._runs_on_cuda, torch.device("cpu")) is False


def test_a_device_without_code_warns(fake_device):
    fake_device("8.0,9.0a", {0: (10, 0)})
    with pytest.warns(RuntimeWarning, match=r"cuda:0: .*no code for this sm_100 device.*including 10\.0"):
        assert _ext._runs_on_cuda(torch.device("cuda", 0))


def test_sm90_device_with_sm90_code_and_old_builds_are_quiet(fake_device):
    fake_device("8.0,9.0a", {0: (9, 0)})
    assert no_warnings(_ext._runs_on_cuda, torch.device("cuda", 0))
    fake_device(None, {0: (9, 0)})  # built without the attribute: nothing to check against
    assert no_warnings(_ext._runs_on_cuda, torch.device("cuda", 0))
