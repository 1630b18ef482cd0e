#!/usr/bin/env bash
# Builds fastkd against each end of the supported torch range and runs the quick tests,
# each torch in its own throwaway venv:
#
#   .ci/build_matrix.sh                  # the oldest supported torch and the newest pip installs
#   .ci/build_matrix.sh 2.6.0 2.11.0     # any list of versions
#
# Per version: a venv, `pip install torch==V numpy ninja setuptools wheel pytest`, then
# `pip install --no-build-isolation` of a copy of this checkout (the files git tracks or
# would track, so uncommitted edits are included), then the quick tests from outside the
# source tree with FASTKD_NO_JIT=1, after checking that fastkd._C is the prebuilt module
# in the venv's site-packages. Prints a summary table; exits non-zero if any version
# failed. Slow (a torch download and a C++ build per version): CI runs it only when
# FASTKD_BUILD_MATRIX=1.
#
# Environment:
#   FASTKD_MATRIX_TORCH    versions when none are given (default "2.4.0 2.14.1")
#   FASTKD_MATRIX_TESTS    pytest arguments, relative to the source root (default below)
#   FASTKD_MATRIX_INDEX    torch index tried first (default: PyTorch's CPU wheels; falls
#                          back to the ordinary registry when unreachable; "" skips it)
#   FASTKD_MATRIX_DIR      where the venvs go (default: a temporary directory)
#   FASTKD_MATRIX_KEEP     1 keeps that directory (logs, venvs) afterwards
#   FASTKD_BUILD_CUDA      default 0 here (1 builds the CUDA kernels and makes any reason not to an error): a registry torch is a CUDA build, and its CUDA
#                          rarely matches the local nvcc; set 1 to build the CUDA kernels
#   PYTHON                 interpreter for the venvs (default python3)
#   MAX_JOBS               parallel compile jobs (default 2)
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
read -r -a VERSIONS <<<"${FASTKD_MATRIX_TORCH:-2.4.0 2.14.1}"
[ "$#" -gt 0 ] && VERSIONS=("$@")
TESTS=${FASTKD_MATRIX_TESTS:-"tests/test_build_flags.py tests/test_errors.py tests/test_ops.py tests/test_correctness.py -k 'not triton'"}
eval "TEST_ARGS=($TESTS)"  # shell words, so that -k 'not triton' stays one argument
INDEX=${FASTKD_MATRIX_INDEX-https://download.pytorch.org/whl/cpu}
export FASTKD_BUILD_CUDA=${FASTKD_BUILD_CUDA:-0}
export MAX_JOBS=${MAX_JOBS:-2}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -n "${FASTKD_MATRIX_DIR:-}" ]; then
  WORK=$FASTKD_MATRIX_DIR
  mkdir -p "$WORK"
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastkd-matrix.XXXXXX")
fi
if [ "${FASTKD_MATRIX_KEEP:-0}" != 1 ]; then
  trap 'rm -rf "$WORK"' EXIT
fi

# The checkout as git sees it: tracked and untracked-but-not-ignored files, no build/ or *.so.
SRC=$WORK/src
rm -rf "$SRC" && mkdir -p "$SRC"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
   [ -e "$f" ] && printf '%s\0' "$f"; done | tar --null -T - -cf -) | tar -xf - -C "$SRC" || {
  echo "build_matrix: could not copy the checkout (is $ROOT a git work tree?)" >&2; exit 2; }

# Test paths point into the copy; pytest runs from elsewhere (see below).
for i in "${!TEST_ARGS[@]}"; do
  case ${TEST_ARGS[$i]} in tests/*|tests) TEST_ARGS[$i]=$SRC/${TEST_ARGS[$i]};; esac
done

if [ -n "$INDEX" ] && ! "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=15)" "$INDEX" 2>/dev/null; then
  echo "build_matrix: $INDEX unreachable; installing torch from the default registry"
  INDEX=
fi

now() { date +%s; }
ROWS=()
status=0

for v in "${VERSIONS[@]}"; do
  venv=$WORK/venv-$v
  log=$WORK/log-$v.txt
  start=$(now)
  build=FAIL tests="-" result="-"
  echo "== torch $v: venv $venv, log $log"
  {
    "$PYTHON" -m venv "$venv" &&
    if [ -n "$INDEX" ]; then
      "$venv/bin/python" -m pip install --index-url "$INDEX" "torch==$v"
    else
      "$venv/bin/python" -m pip install "torch==$v"
    fi &&
    "$venv/bin/python" -m pip install numpy ninja setuptools wheel pytest
  } >"$log" 2>&1
  if [ $? -ne 0 ]; then
    build="no torch"
  elif (cd "$WORK" && "$venv/bin/python" -m pip install -v --no-build-isolation "$SRC") >>"$log" 2>&1; then
    build=ok
  fi
  got=$("$venv/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null || echo "$v")
  if [ "$build" = ok ]; then
    # Outside the source tree, so `import fastkd` is the installed package; FASTKD_NO_JIT=1
    # so that a missing prebuilt fastkd._C fails instead of being JIT-built.
    mkdir -p "$WORK/run"
    if ! (cd "$WORK/run" && FASTKD_NO_JIT=1 "$venv/bin/python" - "$venv" <<'EOF'
import os, sys, sysconfig
import fastkd._ext as ext
m = ext.load_extension()
site = os.path.realpath(sysconfig.get_paths()["purelib"])
assert m is not None and os.path.realpath(m.__file__).startswith(site), f"not the prebuilt fastkd._C: {m}"
print("fastkd._C:", m.__file__, "with CUDA kernels" if getattr(m, "with_cuda", False) else "(CPU kernel)")
EOF
    ) >>"$log" 2>&1; then
      build="not prebuilt"
    else
      out=$(cd "$WORK/run" && FASTKD_NO_JIT=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
              --rootdir "$SRC" -c "$SRC/pyproject.toml" "${TEST_ARGS[@]}" 2>&1)
      rc=$?
      echo "$out" >>"$log"
      tests=$(echo "$out" | grep -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)" | tail -n 1 | sed -E 's/^=+ //; s/ in [0-9.]+s.*//; s/ =+$//')
      tests=${tests:-"pytest rc $rc"}
      [ "$rc" -eq 0 ] && result=ok || result=FAIL
    fi
  fi
  [ "$build" = ok ] && [ "$result" = ok ] || { result=FAIL; status=1; tail -n 30 "$log"; }
  ROWS+=("$(printf '%-14s %-13s %-40s %-6s %5ss' "$got" "$build" "$tests" "$result" "$(( $(now) - start ))")")
done

echo
rev=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null)
[ -z "$(cd "$ROOT" && git status --porcelain 2>/dev/null)" ] || rev="$rev+uncommitted"
echo "fastkd build matrix ($rev, python $("$PYTHON" -c 'import platform; print(platform.python_version())'), $(g++ --version 2>/dev/null | head -n 1))"
printf '%-14s %-13s %-40s %-6s %6s\n' torch build tests result time
for r in "${ROWS[@]}"; do echo "$r"; done
[ "${FASTKD_MATRIX_KEEP:-0}" = 1 ] && echo "logs and venvs kept in $WORK"
exit "$status"
