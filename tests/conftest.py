"""Fixtures shared by the test modules."""
import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module's tiny tensors (restored after): on a busy 2-core
    machine OpenMP spinning makes small ops many times slower with two threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
