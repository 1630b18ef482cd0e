#!/usr/bin/env bash
# Builds fastkd's sdist and wheel and installs each in a clean venv, as a user would:
#   1. sdist + wheel with `python -m build --no-isolation`, in a venv with TORCH_SPEC's torch;
#   2. the wheel into a fresh venv with torch: the prebuilt extension loads, the cpu backend
#      runs, `python -m fastkd.info` works;
#   3. the sdist into a fresh venv with `pip install --no-build-isolation`: same checks;
#   4. a plain (isolated) `pip install .` into a fresh venv: fastkd installs without fastkd._C,
#      says so, and the first call compiles it from the sources the wheel carries.
# Usage: bash .ci/package_check.sh [TORCH_SPEC]   (default torch==2.13.0). About 11 minutes on
# a 2-core machine. `FASTKD_PACKAGE_CHECK=1 bash .ci/run` adds it to CI.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${1:-torch==2.13.0}"
WORK="$(mktemp -d /tmp/fastkd-package-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
say() { printf '\n== %s\n' "$*"; }

fresh_venv() {
  python -m venv "$1"
  "$1/bin/python" -m pip install -q "$TORCH_SPEC" numpy ninja "setuptools>=64" wheel
}

# The wheel is built against TORCH_SPEC's torch, in a venv of its own, as a user building
# for that torch would.
fresh_venv "$WORK/venv-build"
"$WORK/venv-build/bin/python" -m pip install -q build
say "building sdist and wheel (no isolation, torch $("$WORK/venv-build/bin/python" -c 'import torch; print(torch.__version__)'))"
# From a copy of the tracked files: a build in the checkout itself would share its build/
# directory (compiled objects) with any other build running there, e.g. for another torch.
mkdir -p "$WORK/src" && git ls-files -z | xargs -0 tar cf - | tar xf - -C "$WORK/src"
(cd "$WORK/src" && MAX_JOBS=2 "$WORK/venv-build/bin/python" -m build --no-isolation --sdist --wheel --outdir "$WORK/dist" .) \
  > "$WORK/build.log" 2>&1 || { grep -E "error|Error" "$WORK/build.log" | head -20; tail -30 "$WORK/build.log"; exit 1; }
ls -l "$WORK/dist"
SDIST=$(ls "$WORK"/dist/fastkd-*.tar.gz)
WHEEL=$(ls "$WORK"/dist/fastkd-*.whl)
# Listings to files first: `grep -q` on a pipe ends it early, which pipefail reports as failure.
tar tzf "$SDIST" > "$WORK/sdist.txt"
python -m zipfile -l "$WHEEL" > "$WORK/wheel.txt"
grep -q "/csrc/ops.cpp$" "$WORK/sdist.txt" && echo "sdist carries csrc/"
grep -q "/LICENSE$" "$WORK/sdist.txt" && echo "sdist carries LICENSE"
grep -q "fastkd/_csrc/ops.cpp" "$WORK/wheel.txt" && echo "wheel carries fastkd/_csrc/"
grep -q "fastkd/_C" "$WORK/wheel.txt" && echo "wheel carries the compiled fastkd/_C"

# A loss call that must run on the fast cpu backend, and the report, from outside the checkout.
CHECK='import torch, fastkd
s = torch.randn(8, 1000, requires_grad=True); t = torch.randn(8, 1000)
loss = fastkd.kd_loss(s, t, temperature=2.0, backend="cpu"); loss.backward()
ref = fastkd.reference.kd_loss(s.detach().double(), t.double(), temperature=2.0)
assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item()), (loss.item(), ref.item())
print("fastkd", fastkd.__version__, "from", fastkd.__file__, "cpu backend ok, loss", round(loss.item(), 6))'

say "wheel into a clean venv"
fresh_venv "$WORK/venv-wheel"
"$WORK/venv-wheel/bin/python" -m pip install -q "$WHEEL"
(cd "$WORK" && FASTKD_NO_JIT=1 "$WORK/venv-wheel/bin/python" -c "$CHECK")
(cd "$WORK" && "$WORK/venv-wheel/bin/python" -m fastkd.info | grep -E "^fastkd|source|cpu:")

say "sdist into a clean venv (pip install --no-build-isolation)"
fresh_venv "$WORK/venv-sdist"
MAX_JOBS=2 "$WORK/venv-sdist/bin/python" -m pip install -q --no-build-isolation "$SDIST"
(cd "$WORK" && FASTKD_NO_JIT=1 "$WORK/venv-sdist/bin/python" -c "$CHECK")

say "plain pip install . (isolated build: no torch in the build environment)"
fresh_venv "$WORK/venv-plain"
"$WORK/venv-plain/bin/python" -m pip install -v "$WORK/src" > "$WORK/plain.log" 2>&1 || { tail -30 "$WORK/plain.log"; exit 1; }
grep -q "fastkd: torch is not importable in this build environment" "$WORK/plain.log" && echo "the build said why fastkd._C is not compiled"
(cd "$WORK" && "$WORK/venv-plain/bin/python" -m fastkd.info | grep -E "source|problem")
(cd "$WORK" && FASTKD_BUILD_DIR="$WORK/jit" MAX_JOBS=2 "$WORK/venv-plain/bin/python" -c "$CHECK")
ls "$WORK"/jit/*.so > /dev/null && echo "the first call compiled fastkd._C from fastkd/_csrc into $WORK/jit"

say "package check passed"
