"""The package's metadata and build script: one version, the license it claims, the
sources the JIT fallback needs, and a build without torch that says what it does."""
import importlib.metadata
import os
import sys
from pathlib import Path

import fastkd

from harness import processes

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_written_once_and_matches_the_metadata():
    assert importlib.metadata.version("fastkd") == fastkd.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "\nversion =" not in pyproject.split("[tool.setuptools.dynamic]")[0]
    assert f"## {fastkd.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_license_is_the_apache_license_the_metadata_claims():
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_sdist_manifest_carries_the_sources():
    manifest = (ROOT / "MANIFEST.in").read_text().split()
    assert "csrc" in manifest[manifest.index("graft") + 1:]  # graft csrc
    for name in ("LICENSE", "CHANGELOG.md", "README.md"):
        assert name in manifest


def test_build_without_torch_installs_without_the_extension_and_says_why():
    # What an isolated `pip install .` runs: setup.py where torch cannot be imported.
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "__file__ = 'setup.py'; exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    env = {k: v for k, v in os.environ.items() if k != "FASTKD_REQUIRE_EXTENSION"}
    done = processes.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == fastkd.__version__
    assert "torch is not importable in this build environment" in done.stderr
    assert "pip install --no-build-isolation ." in done.stderr


def test_build_without_torch_fails_when_the_extension_is_required():
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "__file__ = 'setup.py'; exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    env = dict(os.environ, FASTKD_REQUIRE_EXTENSION="1")
    done = processes.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert "FASTKD_REQUIRE_EXTENSION=1" in done.stderr and "--no-build-isolation" in done.stderr


def test_wheels_carry_the_sources_for_the_jit_fallback(tmp_path, monkeypatch):
    # An installed package has no csrc/ beside it; cpp_build then finds fastkd/_csrc.
    import importlib.util
    import shutil

    pkg = tmp_path / "site" / "fastkd"
    shutil.copytree(ROOT / "fastkd", pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copytree(ROOT / "csrc", pkg / "_csrc")
    spec = importlib.util.spec_from_file_location("cpp_build_installed", pkg / "backends" / "cpp_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert Path(module.CSRC) == pkg / "_csrc"
    assert all(Path(p).is_file() for p in module.cpu_sources())
