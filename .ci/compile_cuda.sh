#!/usr/bin/env bash
# Compile-only check of fastkd's CUDA sources, for machines with nvcc but no GPU.
#
#   every csrc/cuda/*.cu   nvcc -c for sm_90a and sm_80, with the project's nvcc flags
#                          (fastkd/backends/cpp_build.py) and torch's include paths; ptxas reports
#                          registers and spills per kernel (table printed below)
#   every csrc/cuda/*.cpp  the torch glue (and csrc/ops.cpp with FASTKD_WITH_CUDA), g++ -c against torch's headers and the CUDA
#                          runtime headers nvcc ships
#
# Objects go to a temporary directory that is removed afterwards; nothing is linked or
# installed. Exits non-zero on the first compile error. Environment: PYTHON (python3),
# NVCC (nvcc), CXX (g++), FASTKD_CI_GENCODE (overrides the two -gencode flags).
#
# Arguments (optional) choose what to compile: names of csrc/cuda/*.cu files, and `glue`
# for the host-compiler files; none compiles everything. tests/test_cuda_compile.py passes
# one each, so that pytest-xdist's workers share the check.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
NVCC=${NVCC:-nvcc}
CXX=${CXX:-g++}
GENCODE=${FASTKD_CI_GENCODE:-"-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80"}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

command -v "$NVCC" >/dev/null || { echo "compile_cuda: $NVCC not found" >&2; exit 1; }

# The project's flags, minus its -gencode list (CI pins the two targets above). cpp_build.py
# is loaded by path: importing the fastkd package would load or build the extension.
read -r NVCC_FLAGS CXX_FLAGS < <("$PYTHON" - "$ROOT" <<'EOF'
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("fastkd_build", os.path.join(sys.argv[1], "fastkd", "backends", "cpp_build.py"))
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
std = b.torch_std_flag()  # the standard the installed torch's headers need
archs = ["8.0", "9.0a"]  # as the default GENCODE; given, so TORCH_CUDA_ARCH_LIST is not consulted
nv = [f for f in b.nvcc_flags(archs) if not f.startswith("-gencode")] + [std]
cx = [f for f in b.cxx_flags() if not f.startswith("-march")] + b.cuda_cxx_flags(archs) + [std]
print("|".join(nv), "|".join(cx))  # "|": a flag may hold commas (-DFASTKD_CUDA_ARCHS=8.0,9.0a)
EOF
)
NVCC_FLAGS=${NVCC_FLAGS//|/ }
CXX_FLAGS=${CXX_FLAGS//|/ }

TORCH_INC=$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
TORCH_DIR=$("$PYTHON" -c "import os, torch; print(os.path.dirname(torch.__file__))")
PY_INC=-I$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
# nvcc's own include directory (cuda_runtime.h), as nvcc itself resolves it.
CUDA_INC=$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="\([^"]*\)".*/\1/p' | head -n 1)
[ -n "$CUDA_INC" ] || CUDA_INC="-I/usr/local/cuda/include"

# A CPU-only torch wheel ships c10/cuda headers but not the file CMake generates for
# them; its only content is a Windows export switch, so skipping it is harmless.
GLUE_DEFS="-DTORCH_EXTENSION_NAME=fastkd_C -DTORCH_API_INCLUDE_EXTENSION_H"
if [ ! -f "$TORCH_DIR/include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  GLUE_DEFS="$GLUE_DEFS -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"
fi

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%6.1f s", b - a }'; }

status=0
shopt -s nullglob
CU_FILES=()
GLUE=0
if [ "$#" -eq 0 ]; then
  CU_FILES=("$ROOT"/csrc/cuda/*.cu)
  GLUE=1
fi
for arg in "$@"; do
  if [ "$arg" = glue ]; then
    GLUE=1
  elif [ -f "$ROOT/csrc/cuda/$arg" ]; then
    CU_FILES+=("$ROOT/csrc/cuda/$arg")
  else
    echo "compile_cuda: no csrc/cuda/$arg (arguments: .cu file names or glue)" >&2
    exit 2
  fi
done
echo "nvcc: $("$NVCC" --version | tail -n 1)"
echo "targets: $GENCODE"
echo
for src in "${CU_FILES[@]}"; do
  name=$(basename "$src")
  start=$(now)
  # shellcheck disable=SC2086  # flag lists are meant to split
  if "$NVCC" -c "$src" -o "$TMP/${name%.cu}.o" $NVCC_FLAGS $GENCODE --threads 2 -Xptxas -v \
      $TORCH_INC $PY_INC >"$TMP/$name.log" 2>&1; then
    echo "ok    $(elapsed "$start")  $name"
  else
    echo "FAIL  $(elapsed "$start")  $name"
    grep -v "^ptxas info" "$TMP/$name.log" >&2 || true
    status=1
  fi
done
GLUE_FILES=()
[ "$GLUE" -eq 1 ] && GLUE_FILES=("$ROOT"/csrc/cuda/*.cpp "$ROOT"/csrc/ops.cpp)  # ops.cpp: its CUDA registration
for src in "${GLUE_FILES[@]}"; do
  name=$(basename "$src")
  start=$(now)
  # shellcheck disable=SC2086
  if "$CXX" -c "$src" -o "$TMP/${name%.cpp}.o" -O0 $CXX_FLAGS $GLUE_DEFS $TORCH_INC $PY_INC $CUDA_INC \
      -Wall -Wno-unknown-pragmas >"$TMP/$name.log" 2>&1; then
    echo "ok    $(elapsed "$start")  $name (host compiler, glue)"
  else
    echo "FAIL  $(elapsed "$start")  $name (host compiler, glue)"
    cat "$TMP/$name.log" >&2
    status=1
  fi
done

# Registers and spills per kernel: every sm_90a kernel, and any sm_80 kernel that spills.
echo
"$PYTHON" - "$TMP" <<'EOF'
import glob, os, re, subprocess, sys

def short(mangled):
    try:
        name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
    except OSError:
        name = mangled
    name = re.sub(r"fastkd::cuda::\(anonymous namespace\)::|fastkd::cuda::|\(fastkd::cuda::KDLaunch\)", "", name)
    name = re.sub(r"\(fastkd::Divergence\)(\d)", lambda m: ["fkl", "rkl", "jsd", "tvd"][int(m.group(1))], name)
    return name.replace("void ", "").replace("__nv_bfloat16", "bf16").replace("__half", "f16")

rows = []
for log in sorted(glob.glob(os.path.join(sys.argv[1], "*.cu.log"))):
    kernel = arch = spill = None
    for line in open(log):
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            kernel, arch = m.groups()
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and kernel:
            spill = tuple(int(x) for x in m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and kernel and spill:
            rows.append((os.path.basename(log)[:-4], arch, short(kernel), int(m.group(1))) + spill)
            kernel = spill = None
shown = [r for r in rows if r[1] == "sm_90a" or r[5] > 0]
print(f"{'file':<18} {'arch':<7} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8}  kernel")
for f, arch, k, regs, stack, st, ld in shown:
    print(f"{f:<18} {arch:<7} {regs:>4} {stack:>5} {st:>8} {ld:>8}  {k}")
spilling = [r for r in rows if r[5] > 0]
print(f"\n{len(rows)} kernel builds, {len(spilling)} with spills"
      + (f" (largest {max(r[5] for r in spilling)} bytes)" if spilling else ""))
EOF

if [ "$status" -ne 0 ]; then
  echo "compile_cuda: FAILED" >&2
fi
exit "$status"
