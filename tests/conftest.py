import os

import pyro
import pytest
import torch

# Small networks train faster on one thread, and results do not depend on the core count.
torch.set_num_threads(1)
os.environ.setdefault("PYRO_SPARSE_NO_PROGRESS", "1")


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield


@pytest.fixture(scope="session")
def digits():
    from pyro_sparse.data import load_digits

    return load_digits()


@pytest.fixture
def root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
