"""examples/distill_features.py runs (quick mode, ~20-30 s) and its logits KD beats CE only."""
import math

import torch

from harness.scripts import load_script


def load_example():
    return load_script("examples/distill_features.py")


def test_distill_features_quick(capsys):
    # One thread: under pytest torch is imported before the example can set
    # OMP_WAIT_POLICY=PASSIVE, and OpenMP threads that spin while they wait took 3-4x the
    # CPU time of the script run on its own on a shared 2-core machine (94 s against 24 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = load_example().main(["--quick"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out

    losses = {k: m[k] for k in ("optimal", "teacher", "ce", "kd", "features", "relations")}
    assert all(math.isfinite(v) and v > 0 for v in losses.values()), losses
    assert m["optimal"] < m["teacher"] < m["ce"], losses
    # Logits KD against CE only, same student, same data: quick mode measured +0.46, +0.49
    # and +0.46 nats/token for seeds 0, 1, 2. The feature and relation terms' effects are
    # reported by the example, not asserted: at this scale they do not help (docs/objective.md).
    assert m["ce"] - m["kd"] > 0.3, losses
    # Every student trained: each distilled one is far below the untrained loss log(V).
    assert all(m[k] < math.log(m["vocab"]) - 1.0 for k in ("ce", "kd", "features", "relations")), losses
    # The objective's terms were logged (detached floats), the feature and relation terms included.
    last = m["final_terms"]["relations"]
    assert set(last) == {"logits", "features", "relations", "total"}
    assert all(math.isfinite(v) for v in last.values())
    for line in ("logits KD", "logits + features", "logits + features + relations", "perplexity",
                 "logits KD vs CE only: helped"):
        assert line in out, line
