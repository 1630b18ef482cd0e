"""The several-teachers operators' contract (fastkd/backends/__init__.py, csrc/ops.cpp):
their settings order, the teacher bound and the entry checks every device shares, and the
dispatch of a call with more teachers than one kernel call reads."""
import pytest
import torch

from fastkd import _dispatch
from fastkd.backends import MAX_KERNEL_TEACHERS
from fastkd.config import FLOAT_SETTINGS, MULTI_INT_SETTINGS, MultiKernelSettings, make_config

from harness.registry import backend_names


def test_multi_settings_are_the_dense_ints_then_the_teacher_mode():
    ints, floats = make_config(divergence="tvd", teacher_mode="sum").with_vocab_size(9).multi_kernel_settings()
    assert ints == [3, -100, 9, 1] and len(floats) == len(FLOAT_SETTINGS)
    k = MultiKernelSettings(ints, floats)
    assert (k.divergence, k.teacher_mode, k.vocab_size) == ("tvd", "sum", 9)
    assert make_config().with_vocab_size(9).multi_kernel_settings()[0][-1] == 0  # mixture


needs_cpu = pytest.mark.skipif("cpu" not in backend_names("cpu"), reason="fastkd._C is not built here")


def _op_args(k=2, n=3, v=5, weights=None):
    student = torch.randn(n, v)
    teachers = [torch.randn(n, v) for _ in range(k)]
    w = torch.full((k, n), 1.0 / max(k, 1)) if weights is None else weights
    return student, teachers, w, None, torch.ones(()), *make_config().with_vocab_size(v).multi_kernel_settings()


@needs_cpu
def test_the_extension_agrees_on_the_settings_and_the_bound():
    from fastkd.backends.cpp import load_extension

    ext = load_extension()
    assert tuple(ext.multi_int_settings) == MULTI_INT_SETTINGS
    assert ext.max_kernel_teachers == MAX_KERNEL_TEACHERS


@needs_cpu
@pytest.mark.parametrize("case, match", [
    (dict(k=MAX_KERNEL_TEACHERS + 1), f"take 1 to {MAX_KERNEL_TEACHERS} teachers, got {MAX_KERNEL_TEACHERS + 1}"),
    (dict(k=0), "take 1 to"),
    (dict(weights=torch.full((2, 3), 0.5, dtype=torch.float64)), "weights must be a Float"),
    (dict(weights=torch.full((2, 4), 0.5)), r"\[K, N\] = \[2, 3\]"),
    (dict(weights=torch.full((3, 3), 0.5)), r"\[K, N\] = \[2, 3\]"),
])
def test_the_operator_entry_check(case, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastkd.kd_multi_forward(*_op_args(**case))


@needs_cpu
def test_the_operator_checks_every_teacher_and_the_mode():
    student, teachers, w, labels, scale, ints, floats = _op_args()
    teachers[1] = torch.randn(3, 4)  # narrower than vocab_size 5
    with pytest.raises(RuntimeError, match="vocab_size 5 must be in"):
        torch.ops.fastkd.kd_multi_forward(student, teachers, w, labels, scale, ints, floats)
    student, teachers, w, labels, scale, ints, floats = _op_args()
    with pytest.raises(RuntimeError, match="unknown teacher mode id"):
        torch.ops.fastkd.kd_multi_forward(student, teachers, w, labels, scale, ints[:3] + [2], floats)
    with pytest.raises(RuntimeError, match="expected 4 int"):
        torch.ops.fastkd.kd_multi_forward(student, teachers, w, labels, scale, ints[:3], floats)


def test_more_teachers_than_a_kernel_reads_run_on_torch(monkeypatch):
    # A backend that runs several teachers runs at most MAX_KERNEL_TEACHERS of them: auto
    # sends a larger K to torch, and naming the backend says why.
    monkeypatch.setattr(_dispatch, "MULTI_TEACHER_BACKENDS", _dispatch.MULTI_TEACHER_BACKENDS | {"cpu"})
    if "cpu" not in backend_names("cpu"):
        pytest.skip("fastkd._C is not built here")
    cpu = torch.device("cpu")
    assert _dispatch.backend_for("auto", cpu, torch.float32, several_teachers=MAX_KERNEL_TEACHERS).name == "cpu"
    assert _dispatch.backend_for("auto", cpu, torch.float32, several_teachers=MAX_KERNEL_TEACHERS + 1).name == "torch"
    with pytest.raises(NotImplementedError, match=f"runs at most {MAX_KERNEL_TEACHERS} teachers in one call"):
        _dispatch.backend_for("cpu", cpu, torch.float32, several_teachers=MAX_KERNEL_TEACHERS + 1)
