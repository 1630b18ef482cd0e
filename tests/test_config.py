"""The loss description (fastkd/config.py): every setting declared once reaches every public
entry point, and is validated once, by make_config."""
import inspect

import pytest
import torch

import fastkd
from fastkd.config import FLOAT_SETTINGS, INT_SETTINGS, SETTING_NAMES, KDConfig

PUBLIC = [fastkd.kd_loss, fastkd.KDLoss, fastkd.fused_linear_kd_loss, fastkd.FusedLinearKDLoss,
          fastkd.reference.kd_loss]


@pytest.mark.parametrize("entry", PUBLIC, ids=lambda f: f.__qualname__)
def test_every_public_entry_lists_every_setting(entry):
    params = inspect.signature(entry).parameters
    for name in SETTING_NAMES:
        assert name in params, (entry, name)
        assert params[name].default == KDConfig.__dataclass_fields__[name].default
    doc = (entry.__init__ if isinstance(entry, type) else entry).__doc__ or entry.__doc__
    if entry is not fastkd.KDLoss and entry is not fastkd.FusedLinearKDLoss:
        assert "{settings}" not in doc and all(f"{name}:" in doc for name in SETTING_NAMES), entry


@pytest.mark.parametrize("entry", [fastkd.kd_loss, fastkd.fused_linear_kd_loss, fastkd.KDLoss,
                                   fastkd.FusedLinearKDLoss], ids=lambda f: f.__qualname__)
def test_unknown_keyword_names_the_entry_point(entry):
    with pytest.raises(TypeError, match=rf"{entry.__name__}\(\) got an unexpected keyword argument 'temprature'"):
        if isinstance(entry, type):
            entry(temprature=2.0)
        else:
            s = torch.zeros(2, 5)
            args = (s, s) if entry is fastkd.kd_loss else (s, torch.zeros(5, 5), s, torch.zeros(5, 5))
            entry(*args, temprature=2.0)


def test_modules_hold_the_validated_config():
    crit = fastkd.KDLoss("jsd", beta=0.0, temperature=2.0)
    assert crit.config == fastkd.make_config(divergence="jsd", beta=0.0, temperature=2.0)
    assert crit.config.divergence == "forward_kl"  # jsd at beta 0 is forward KL, resolved once
    assert "temperature=2.0" in repr(crit) and "alpha" not in repr(crit)  # defaults left out
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fastkd.FusedLinearKDLoss(temperature=0.0)


def test_kernel_settings_are_the_derived_values():
    cfg = fastkd.make_config(divergence="reverse_kl", temperature=2.0, alpha=0.75, ignore_index=3, softcap=30.0,
                             teacher_logit_scale=2.0, label_smoothing=0.22, z_loss=0.5).with_vocab_size(11)
    ints, floats = cfg.kernel_settings()
    assert dict(zip(INT_SETTINGS, ints)) == {"divergence_id": 1, "ignore_index": 3, "vocab_size": 11}
    # The floats travel as a float64 host tensor (a tensor stays symbolic under torch.compile).
    assert floats.dtype == torch.float64 and floats.device.type == "cpu" and floats.shape == (len(FLOAT_SETTINGS),)
    assert dict(zip(FLOAT_SETTINGS, floats.tolist())) == {
        "inv_temperature": 0.5, "beta": 0.5, "div_weight": 3.0, "ce_weight": 0.25, "logit_scale": 1.0,
        "softcap_value": 30.0, "teacher_scale": 2.0, "teacher_softcap_value": 30.0, "label_smoothing": 0.22,
        "smooth_per_class": 0.02, "z_loss": 0.5}
    # A vocab-parallel shard spreads epsilon over the global classes, not its own columns.
    assert cfg.with_vocab_size(3, classes=11).smooth_per_class == 0.02
    assert cfg.with_vocab_size(11) is cfg and cfg.with_vocab_size(7).vocab_size == 7
