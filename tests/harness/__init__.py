"""The test harness: one place for what every test file shares.

    backends.py   the harness's only use of fastkd internals (kernel backends, the CUDA plan op)
    registry.py   the backends and ops the suite runs on; tests parametrize over it
    cases.py      Case / LinearCase sample lists and ErrorCase bad-input lists, per op
    inputs.py     device-aware input makers: logits, labels, layouts, each case's tensors
    results.py    running the float64 reference and a backend: loss and gradients
    compare.py    relative errors and the tolerance policy (dtype tolerances, 2x torch fp32)
    fixtures.py   pytest fixtures (no_host_sync, store_counter, gloo_ranks), loaded by conftest.py
    ranks.py      a pool of CPU ranks (gloo) that runs the distributed tests' cases
"""
