"""examples/trl_gkd_distill.py --quick runs: TRL's GKD trainer, the fastkd patch and the
fused-linear trainer train the same tiny student to the same losses (about 15-30 s)."""
import math
import os

import pytest

from harness.scripts import load_script

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl", reason="TRL is not installed (the TRL integration is optional)")
pytest.importorskip("trl.experimental.gkd", reason="this trl has no trl.experimental.gkd (written for trl 1.16)")
pytest.importorskip("datasets", reason="datasets is not installed (the example builds its data with it)")
pytest.importorskip("tokenizers", reason="tokenizers is not installed (the example builds a tokenizer with it)")


def load_example():
    return load_script("examples/trl_gkd_distill.py")


def test_trl_gkd_example_quick(capsys):
    result = load_example().main(["--quick", "--seed", "0"])
    out = capsys.readouterr().out
    losses = result["losses"]
    assert set(losses) == {"TRL", "patched", "fused-linear"}
    for name, values in losses.items():
        assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values), (name, values)
    # Drop-in: the same student, seed and batches give TRL's losses (fp32 rounding only).
    for name in ("patched", "fused-linear"):
        for ours, theirs in zip(losses[name], losses["TRL"]):
            assert ours == pytest.approx(theirs, rel=1e-5), (name, losses)
    assert result["restored"] is True and "patch restored after the with-block: yes" in out
    assert result["backend"] in ("cpu", "torch", "cuda", "triton")
    for row in result["timings"]:
        assert row["trl_ms"] > 0 and row["fastkd_ms"] > 0 and row["abs_err"] < 1e-5
    assert "loss per step" in out and "speed-up" in out
