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


@pytest.fixture
def interrupted_run():
    """``run(model, recipe, out, epochs)``: fit ``epochs // 2`` epochs into ``out``, raise the saved
    recipe's epochs to ``epochs`` and resume; returns the resumed run's metrics."""
    import yaml

    from pyro_sparse.runs import fit_run

    def run(model, recipe, out, epochs):
        fit_run(model, recipe, "digits", str(out), epochs=epochs // 2, progress=False)
        saved = yaml.safe_load(open(os.path.join(out, "inference.yaml")))
        saved["epochs"] = epochs
        with open(os.path.join(out, "inference.yaml"), "w") as f:
            yaml.safe_dump(saved, f)
        return fit_run(model, recipe, "digits", str(out), resume=True, progress=False)[1]

    return run
