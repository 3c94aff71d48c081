"""Post-training quantization of a naturally trained SmallCNN on real Fashion-MNIST
(METHODS section 1): 8 bits keeps the float accuracy, 2 bits clearly loses some.

Measured (10k training examples, 2 epochs, seeds 0-2, 2000 test examples): FP 84.2-84.9%,
8 bits within 0.1 point of FP, 4 bits within 0.4, 2 bits 15-28 points below FP.
"""
import pytest

from rqlab import data, models, quant
from rqlab.training import TrainConfig, accuracy, fit, seed_everything
from rqlab.validate import RqlabError


@pytest.fixture(scope="module")
def fmnist():
    try:
        train = data.load("fashion-mnist", "train", n=10_000, seed=0)
        test = data.load("fashion-mnist", "test", n=2_000, seed=0)
    except RqlabError as e:
        pytest.skip(f"Fashion-MNIST is not available: {e}")
    return train, test


def test_ptq_8_bits_keeps_accuracy_and_2_bits_loses_it(fmnist):
    train, test = fmnist
    cfg = TrainConfig(epochs=2, batch_size=128, lr=0.1, schedule="step", seed=0, device="cpu")
    seed_everything(cfg.seed)
    model = models.create("smallcnn", input_shape=train.input_shape, mean=train.mean, std=train.std,
                          num_classes=train.num_classes)
    fit(model, data.Loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed), cfg, progress=False, log=None)

    calib = [b for _, b in zip(range(4), data.Loader(train, 128))]  # 512 training images
    quant.calibrate(model, calib, bits=[2, 4, 8])
    test_loader = data.Loader(test, 500)
    acc = {b: 100 * accuracy(model, test_loader, quant.Fixed(b)) for b in (32, 8, 4, 2)}

    assert acc[32] > 80, acc
    assert abs(acc[8] - acc[32]) <= 1.0, acc
    assert acc[4] >= acc[32] - 2.0, acc
    assert acc[2] <= acc[32] - 8.0, acc
    assert quant.current(model) == quant.Fixed(32)  # accuracy(policy=...) restored the FP policy
