"""The pieces of fastkd's benchmarks; the command lines beside this package use them.

    inputs.py      random inputs of one case (logits, or hidden states and LM-head weights)
    loss.py        LossSpec: the divergence, T, beta, alpha every row of a case computes
    runner.py      what one table row runs: forward + backward of one implementation
    baselines.py   eager PyTorch, torch.compile of it, Liger-Kernel when installed
    candidates.py  the fastkd rows, and which fastkd backends run here
    timing.py      warm-up, repetitions and medians: perf_counter on CPU, do_bench/events on CUDA
    memory.py      peak memory one call needs above its inputs
    ceilings.py    what the machine allows (copy bandwidth, matmul throughput) and each op's floor
    case.py        one case: every implementation on the same inputs, checked against eager
    report.py      the machine description, the Markdown table and the JSON file
    plot.py        the optional PNG (matplotlib)

Modules import each other relatively, so the package works both as `harness` (scripts in
benchmarks/) and as `benchmarks.harness`.
"""
