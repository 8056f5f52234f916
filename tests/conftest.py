"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread per test: the CI machine has 2 cores, and tests that start workers or
    a second process (torchrun) oversubscribe them badly with more; tiny tensors gain nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
