"""Shared fixtures: real Fashion-MNIST and a naturally trained SmallCNN (trained once,
cached on disk under pytest's cache directory); for the notebook tests, the python3
kernel check, the smoke parameters and tiny stand-in models (tests/nbsetup.py).

The training loop here is a deliberately tiny SGD loop (one epoch over the 60k
training images). One epoch over only 10k images gives ~85% accuracy too, but a model
that keeps 10-15% accuracy under PGD-20 at eps 0.1 (smoother, mostly on trousers);
seeing all 60k images makes it as brittle as a natural model should be (~2%).
rqlab.training.fit may replace this loop.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nbsetup

FMNIST_NORM = dict(input_shape=(1, 28, 28), mean=(0.286,), std=(0.353,))
RECIPE = "smallcnn-fmnist-60k-e1-sgd0.1-wd5e-4-bs128-seed0-v2"  # change to retrain the cached model


def load_fmnist(split: str, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """n examples of a split (rqlab.data's seeded subset, seed 0): x float (n, 1, 28, 28)
    in [0, 1], y int64 (n,). Skips the test when the data is not available."""
    from rqlab import data
    from rqlab.validate import RqlabError

    try:
        ds = data.load("fashion-mnist", split, n=n, seed=0)
    except RqlabError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")
    return ds.x.float() / 255, ds.y


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module of tiny passes (more threads only add
    overhead and oversubscribe a shared CPU): `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fmnist_test():
    """500 Fashion-MNIST test examples (x in [0, 1], y)."""
    return load_fmnist("test", 500)


@pytest.fixture(scope="session")
def fmnist_train():
    return load_fmnist("train", None)


@pytest.fixture(scope="session")
def trained_smallcnn(request):
    """A SmallCNN naturally trained at FP for one epoch over the 60k Fashion-MNIST
    training images (SGD 0.1, momentum 0.9, weight decay 5e-4, batch 128; ~88% test
    accuracy; ~1 min on one idle core), in eval mode. Cached on disk; treat it as
    read-only (change its precision only inside quant.using)."""
    from rqlab import models

    torch.manual_seed(0)
    model = models.create("smallcnn", **FMNIST_NORM)
    cache = Path(request.config.cache.mkdir("rqlab-models")) / f"{RECIPE}.pt"
    try:
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    except (FileNotFoundError, RuntimeError, EOFError):
        pass
    x, y = request.getfixturevalue("fmnist_train")  # loaded only when training
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    model.train()
    for i in range(0, len(x), 128):
        j = order[i:i + 128]
        loss = torch.nn.functional.cross_entropy(model(x[j]), y[j])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), cache)
    return model.eval()


# ---- browser tests (tests/test_browser.py) --------------------------------------------------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing browser test gets a screenshot of that moment and the browser console (in
    test-artifacts/browser/<test>/ and in the report)."""
    outcome = yield
    rep = outcome.get_result()
    tab = getattr(item, "rqlab_tab", None)
    if tab is not None and rep.failed and rep.when == "call":
        rep.sections.append(("browser", tab.on_failure()))


# ---- notebooks (tests/test_notebooks.py, tests/test_browser.py; helpers in nbsetup.py) ------

@pytest.fixture(scope="session")
def kernel():
    """Skips when there is no usable python3 kernel."""
    nbsetup.check_kernel()


@pytest.fixture(scope="session")
def smoke():
    """{stem: parameters of its first run} in the smoke profile of reports/default.yaml."""
    return nbsetup.smoke_params()


@pytest.fixture(scope="session")
def tiny(request):
    """tiny(role) -> a stand-in checkpoint's path, trained on first use (only when a zoo
    model is missing; see nbsetup.with_models)."""
    return nbsetup.tiny_models(Path(request.config.cache.mkdir("rqlab-models")))
