import os

import pytest
import torch

# Two cores: keep each test process on one thread so parallel work does not thrash.
torch.set_num_threads(int(os.environ.get("DEVINTERP_TEST_THREADS", "1")))


@pytest.fixture
def seed() -> int:
    return 0
