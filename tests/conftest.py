"""pytest setup. The shared machinery is the harness package (tests/harness); the
(backend, device) pairs of the shared correctness suite come from its registry.

harness.backends is imported first: without a GPU it sets TRITON_INTERPRET=1, which must
happen before triton (and so any fastkd backend) is imported.
"""
import harness.backends  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
from harness.fixtures import gloo_ranks, no_host_sync, store_counter  # noqa: F401  (fixtures for every test file)
