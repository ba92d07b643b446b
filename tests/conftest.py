import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: with 2+ threads on a busy machine, OpenMP waits dominate the run time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
