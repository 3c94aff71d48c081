"""The training loop, its checkpoints and `rqlab train`.

Fast: synthetic 28x28 images (class k = a bright square in one of four places), a few
hundred examples, CPU. The central check: an interrupted and resumed run ends with
exactly the weights of an uninterrupted one.
"""
import argparse
import json
import os
import random

import pytest
import rqlab
import torch

from rqlab import checkpoint, models, quant
from rqlab.cli.train import add_cli, run_cli
from rqlab.training import Hooks, TrainConfig, accuracy, fit, lr_at, seed_everything
from rqlab.validate import RqlabError


# ---- a tiny dataset with the data.Loader interface --------------------------------------

class TensorLoader:
    """(x, y) batches from tensors; order from seed + epoch, like rqlab.data.Loader."""

    def __init__(self, x, y, batch_size, shuffle=False, seed=0):
        self.x, self.y, self.batch_size, self.shuffle, self.seed, self.epoch = x, y, batch_size, shuffle, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = len(self.x)
        idx = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
               if self.shuffle else torch.arange(n))
        for i in range(0, n, self.batch_size):
            j = idx[i:i + self.batch_size]
            yield self.x[j], self.y[j]


def squares(n, seed=0):
    """Noise images with a bright 8x8 square in the quadrant of the label (4 classes)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.rand(n, 1, 28, 28, generator=g)
    for k, (r, c) in enumerate([(3, 3), (3, 17), (17, 3), (17, 17)]):
        x[y == k, :, r:r + 8, c:c + 8] += 0.6
    return x.clamp(0, 1), y


def make_model(seed=0, **kw):
    seed_everything(seed)
    return models.create("smallcnn", input_shape=(1, 28, 28), mean=(0.25,), std=(0.25,), num_classes=4, **kw)


def loaders(n=512, batch_size=64):
    x, y = squares(n)
    xt, yt = squares(256, seed=1)
    return TensorLoader(x, y, batch_size, shuffle=True, seed=0), TensorLoader(xt, yt, 128)


CFG = dict(epochs=2, batch_size=64, lr=0.05, device="cpu", seed=0)


# ---- resume gives the same weights --------------------------------------------------------

class Interrupt(Hooks):
    """Natural training that dies (like Ctrl-C) at the first step of epoch `at`."""

    def __init__(self, at, steps):
        self.stop_step = at * steps

    def precision(self, model, step):
        if step == self.stop_step:
            raise KeyboardInterrupt


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("bits", ["fp", "4-8"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, bits):
    cfg = TrainConfig(**CFG)
    train, test = loaders()

    full = quant.apply(make_model(), quant.parse_policy(bits, seed=0))
    h_full = fit(full, train, cfg, out=tmp_path / "full", test_loader=test, progress=False, log=None)

    part = quant.apply(make_model(), quant.parse_policy(bits, seed=0))
    with pytest.raises(KeyboardInterrupt):
        fit(part, train, cfg, out=tmp_path / "part", test_loader=test, progress=False, log=None,
            hooks=Interrupt(at=1, steps=len(train)))
    assert checkpoint.load(tmp_path / "part" / "checkpoint.pt")["epoch"] == 1
    # a new process: a fresh model with other initial weights and RNG state
    resumed = quant.apply(make_model(seed=123), quant.parse_policy(bits, seed=0))
    torch.manual_seed(999), random.seed(999)
    h_res = fit(resumed, train, cfg, out=tmp_path / "part", test_loader=test, progress=False, log=None)

    assert_same_state(full, resumed)
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k} for r in h]  # noqa: E731
    assert strip(h_full) == strip(h_res)
    assert json.loads((tmp_path / "part" / "history.json").read_text()) == h_res


def test_resume_with_other_config_names_the_fields(tmp_path):
    train, test = loaders(256)
    fit(make_model(), train, TrainConfig(**{**CFG, "epochs": 1}), out=tmp_path, progress=False, log=None)
    with pytest.raises(RqlabError, match=r"train_config\.lr.*0\.05.*0\.1") as e:
        fit(make_model(), train, TrainConfig(**{**CFG, "lr": 0.1}), out=tmp_path, progress=False, log=None)
    assert "no-resume" in str(e.value)
    with pytest.raises(RqlabError, match=r"policy\.bits"):
        fit(quant.apply(make_model(), quant.Fixed(4)), train, TrainConfig(**CFG), out=tmp_path,
            progress=False, log=None)
    class Eps(Hooks):
        def config(self):
            return {"eps": 0.1}

    with pytest.raises(RqlabError, match=r"hooks\.eps: None in the checkpoint, 0\.1 now"):
        fit(make_model(), train, TrainConfig(**CFG), hooks=Eps(), out=tmp_path, progress=False, log=None)
    # epochs may grow (extending a run); resume=False starts over
    h = fit(make_model(), train, TrainConfig(**CFG), out=tmp_path, progress=False, log=None)
    assert [r["epoch"] for r in h] == [1, 2]
    h = fit(make_model(), train, TrainConfig(**{**CFG, "lr": 0.1, "epochs": 1}), out=tmp_path, resume=False,
            progress=False, log=None)
    assert [r["epoch"] for r in h] == [1]


# ---- checkpoints --------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path):
    model = quant.apply(make_model(), quant.Fixed(4))
    train, _ = loaders(128)
    fit(model, train, TrainConfig(**{**CFG, "epochs": 1}), out=tmp_path, progress=False, log=None)
    return tmp_path / "checkpoint.pt", model


def test_load_model_rebuilds_weights_and_policy(ckpt):
    path, model = ckpt
    loaded = rqlab.load(path)
    assert_same_state(model, loaded)
    assert quant.current(loaded) == quant.Fixed(4) and not loaded.training
    x, _ = squares(8)
    model.eval()
    assert torch.equal(model(x), loaded(x))
    assert len(checkpoint.sha256(path)) == 64


def test_truncated_checkpoint_raises_naming_the_file(ckpt, tmp_path):
    path, _ = ckpt
    bad = tmp_path / "half.pt"
    data = path.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(RqlabError, match="half.pt.*(truncated|corrupt)"):
        checkpoint.load(bad)


def test_not_a_checkpoint_and_missing_file_raise(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, plain)
    with pytest.raises(RqlabError, match="plain.pt is not an rqlab checkpoint"):
        checkpoint.load(plain)
    text = tmp_path / "notes.pt"
    text.write_text("not a torch file")
    with pytest.raises(RqlabError, match="notes.pt"):
        checkpoint.load(text)
    with pytest.raises(RqlabError, match="nothere.pt.* is not an existing checkpoint file"):
        rqlab.load(tmp_path / "nothere.pt")
    old = tmp_path / "old.pt"
    torch.save({"format": "rqlab-checkpoint", "version": 0}, old)
    with pytest.raises(RqlabError, match="old.pt has version 0"):
        checkpoint.load(old)


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_save_is_atomic(tmp_path, monkeypatch, error):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"epoch": 1, "w": torch.ones(10)})
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)  # some bytes reach the temp file
        raise error("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(error):
        checkpoint.save(path, {"epoch": 2, "w": torch.zeros(10)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert checkpoint.load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left


def test_policy_round_trips_through_dict():
    for p in [quant.Fixed(4), quant.Fixed(32, act_bits=4), quant.Fixed(32),
              quant.PerLayer({"conv2": 3, "fc1": (4, 6)}), quant.RandomPrecision((4, 5, 8), seed=3)]:
        q = quant.policy_from_dict(p.to_dict())
        assert q.to_dict() == p.to_dict() and str(q) == str(p)


# ---- config, schedule, loop -------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("epochs", 0), ("lr", -0.1), ("lr", 0.0), ("schedule", "foo"),
                                          ("device", "tpu"), ("batch_size", 0), ("momentum", 1.5),
                                          ("amp", "yes"), ("n_train", 0), ("weight_decay", float("nan"))])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(RqlabError, match=field):
        TrainConfig(**{field: value})


def test_step_schedule_decays_at_half_and_three_quarters():
    cfg = TrainConfig(epochs=4, lr=0.1, schedule="step")
    total = 4 * 100
    lrs = [lr_at(cfg, s, total) for s in range(total)]
    assert lrs[0] == lrs[199] == 0.1
    assert lrs[200] == lrs[299] == pytest.approx(0.01)
    assert lrs[300] == lrs[-1] == pytest.approx(0.001)
    cos = TrainConfig(epochs=4, lr=0.1, schedule="cosine")
    assert lr_at(cos, 0, total) == 0.1 and lr_at(cos, 200, total) == pytest.approx(0.05)
    assert lr_at(TrainConfig(schedule="constant"), 399, total) == 0.1


def test_training_lowers_the_loss_and_learns():
    train, test = loaders(512)
    model = make_model()
    before = accuracy(model, test)
    h = fit(model, train, TrainConfig(**{**CFG, "schedule": "constant"}), test_loader=test,
            progress=False, log=None)
    assert h[-1]["train_loss"] < 0.5 * h[0]["train_loss"]
    assert h[-1]["clean_accuracy"] > 0.9 > before + 0.3
    assert h[-1]["lr"] == 0.05 and h[-1]["cumulative_time_s"] >= h[-1]["epoch_time_s"] > 0
    assert set(h[0]) == {"epoch", "train_loss", "train_acc", "clean_accuracy", "lr", "epoch_time_s", "cumulative_time_s"}


class Oracle(torch.nn.Module):
    """A stand-in classifier whose prediction is written in its input: x (B, 1) holds the
    class it predicts (one-hot logits over 4 classes). One dummy parameter, so that
    `accuracy` finds a device."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):  # (B, 1) -> (B, 4)
        return torch.nn.functional.one_hot(x[:, 0].long(), 4).float() + 0 * self.dummy


# predictions 0..3 repeated, labels chosen so that exactly examples 0, 5 and 6 are right
ORACLE_PRED = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]).float().unsqueeze(1)  # (8, 1)
ORACLE_Y = torch.tensor([0, 2, 3, 0, 1, 1, 2, 2])
ORACLE_LOADER = [(ORACLE_PRED[i:i + 3], ORACLE_Y[i:i + 3]) for i in range(0, 8, 3)]  # batches 3, 3, 2


@pytest.mark.parametrize("n, expected", [(None, 3 / 8), (1, 1.0), (2, 1 / 2), (4, 1 / 4), (5, 1 / 5),
                                         (6, 2 / 6), (7, 3 / 7), (8, 3 / 8), (100, 3 / 8)])
def test_accuracy_is_the_share_correct_among_the_first_n(n, expected):
    """Hand count: 3 of the 8 are right (examples 0, 5, 6); `n` keeps the first n examples,
    cutting inside a batch (n=4, 5, 7) or not (n=6); n beyond the data counts all 8."""
    assert accuracy(Oracle(), ORACLE_LOADER, n=n) == expected


def test_accuracy_of_an_empty_loader_is_an_error():
    with pytest.raises(RqlabError, match="no examples"):
        accuracy(Oracle(), [])


def test_accuracy_restores_mode_and_policy():
    _, test = loaders()
    model = quant.apply(make_model(), quant.Fixed(32))
    model.train()
    x, y = test.x[:100], test.y[:100]
    model.eval()
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean().item()  # a direct forward pass
    model.train()
    assert accuracy(model, test, n=100) == pytest.approx(expected)
    assert model.training and quant.current(model) == quant.Fixed(32)
    with pytest.raises(RqlabError, match="never trained or calibrated"):
        accuracy(model, test, policy=quant.Fixed(4))
    assert quant.current(model) == quant.Fixed(32)


def test_loader_batch_size_must_match_config():
    train, _ = loaders(128, batch_size=32)
    with pytest.raises(RqlabError, match="batch_size"):
        fit(make_model(), train, TrainConfig(**CFG), progress=False, log=None)


# ---- rqlab train --------------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser(prog="rqlab")
    add_cli(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", *argv])


def test_cli_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(RqlabError, match="model='nope' is unknown: choose one of smallcnn"):
        run_cli(parse(["--model", "nope", "--out", str(tmp_path)]))


def test_cli_trains_and_writes_checkpoint_and_history(tmp_path, capsys):
    args = parse(["--data", "fashion-mnist", "--n-train", "256", "--eval-n", "256", "--epochs", "1",
                  "--batch-size", "64", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "clean test accuracy" in out and "checkpoint.pt" in out
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == 1 and 0 <= history[0]["clean_accuracy"] <= 1
    model = rqlab.load(tmp_path / "run" / "checkpoint.pt")
    assert model.config.name == "smallcnn"


def test_rqlab_train_is_registered_and_prints_errors_without_traceback(capsys):
    from rqlab import cli

    assert cli.main(["train", "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rqlab: error: model='nope' is unknown") and "Traceback" not in err
    assert cli.main(["train", "--schedule", "foo", "--n-train", "64"]) == 2
    assert "schedule='foo' is unknown" in capsys.readouterr().err


@pytest.mark.parametrize("bits", ["fp", "4", "1"])
def test_channels_last_on_cpu_trains_in_nhwc_with_the_same_arithmetic(bits):
    """channels_last is honoured on a CPU (oneDNN is faster in NHWC): the convolutions'
    weights train in NHWC; the quantized forward gives the NCHW logits; natural FP
    training follows the NCHW run up to float rounding, and PGD training (whose sign steps
    and quantizer grids turn rounding into other, equally good trajectories) reaches
    about the same loss."""
    import copy

    from rqlab import defenses

    train, test = loaders(n=256)
    x = next(iter(test))[0]
    runs = {}
    for defense in ("natural", "pgd-at"):
        for cl in (False, True):
            model = quant.apply(make_model(), quant.parse_policy(bits, seed=0))
            hooks = defenses.build(defense, eps=0.1, steps=3, step_size=0.04) if defense != "natural" else None
            h = fit(model, train, TrainConfig(**{**CFG, "epochs": 1}, channels_last=cl), hooks=hooks,
                    progress=False, log=None)
            assert model.conv2.weight.is_contiguous(memory_format=torch.channels_last) is cl
            runs[defense, cl] = model, h[-1]["train_loss"]
    nchw = runs["natural", False][0].eval()
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    assert torch.allclose(nchw(x), nhwc(x), atol=1e-4)
    if bits == "fp":
        for k, v in runs["natural", False][0].state_dict().items():
            assert torch.allclose(v.float(), runs["natural", True][0].state_dict()[k].float(), atol=1e-4), k
    for defense in ("natural", "pgd-at"):
        assert abs(runs[defense, False][1] - runs[defense, True][1]) < 0.05
