"""Moved to tests/harness (cases.py, inputs.py). This re-export remains for
benchmarks/emulate_cuda_centring.py, which puts tests/ on sys.path and imports from here."""
from harness.cases import Case  # noqa: F401
from harness.inputs import make_inputs  # noqa: F401
