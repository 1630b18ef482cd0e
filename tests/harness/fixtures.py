"""pytest fixtures shared by the test files (conftest.py makes them available)."""
import pytest
import torch


class StoreCounter:
    def __init__(self):
        self.count = 0


@pytest.fixture
def store_counter(monkeypatch):
    """Counts the masked stores the Triton interpreter executes."""
    from triton.runtime import interpreter

    counter = StoreCounter()
    original = interpreter.InterpreterBuilder.create_masked_store

    def counting(self, *args, **kwargs):
        counter.count += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", counting)
    return counter


@pytest.fixture
def no_host_sync(monkeypatch):
    """Reading a tensor's value on the host fails inside the block."""
    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation (.item()/bool()/float() on a tensor)")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.fixture(scope="session")
def gloo_ranks():
    """The session's pool of CPU ranks (harness/ranks.py), started on its first call."""
    from harness.ranks import Ranks

    ranks = Ranks()
    yield ranks
    ranks.close()
