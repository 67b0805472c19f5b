"""Model tests run torch on one thread: tiny tensors gain nothing from two, and a busy machine makes spinning OpenMP workers slow."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
