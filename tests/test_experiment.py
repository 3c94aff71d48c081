"""The experiment layer: RunSpec (validated, serialisable, one spelling on the command
line), rqlab.train (the same weights as the hand-assembled pipeline it replaced), the one
PGD-AT step rule, and rqlab.load (a zoo name or a path)."""
import json
import shlex

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rqlab
from rqlab import data, defenses, models, quant, zoo
from rqlab.cli import build_parser, main
from rqlab.cli.train import spec_from_args
from rqlab.defenses import PGDTraining, pgd_train_step
from rqlab.experiment import RunSpec, TrainConfig, build_hooks
from rqlab.record import Record
from rqlab.training import fit, seed_everything
from rqlab.validate import FP_BITS, RqlabError

BITS = st.sampled_from([*range(1, 17), FP_BITS])


@st.composite
def policies(draw, seed):
    kind = draw(st.sampled_from(["fixed", "wa", "random"]))
    if kind == "fixed":
        return quant.Fixed(draw(BITS))
    if kind == "wa":
        return quant.Fixed(draw(BITS), act_bits=draw(BITS))
    choices = draw(st.lists(st.integers(2, 16), min_size=2, max_size=5, unique=True))
    return quant.RandomPrecision(tuple(sorted(choices)), seed=seed)


@st.composite
def specs(draw):
    seed = draw(st.integers(0, 1000))
    defense = draw(st.sampled_from(defenses.names()))
    policy = draw(policies(seed))
    if defenses.needs_bits_set(defense) and not isinstance(policy, quant.RandomPrecision):
        policy = quant.RandomPrecision((4, 8), seed=seed)
    params = defenses.get(defense).params
    config = {}
    if "steps" in params and draw(st.booleans()):
        config["steps"] = draw(st.integers(1, 20))
    if "beta" in params and draw(st.booleans()):
        config["beta"] = draw(st.floats(0, 1e-1, allow_nan=False))
    if "lam" in params and draw(st.booleans()):
        config["lam"] = draw(st.floats(0, 10, allow_nan=False))
    train = TrainConfig(epochs=draw(st.integers(1, 200)), batch_size=draw(st.integers(1, 512)),
                        lr=draw(st.floats(1e-4, 1.0)), schedule=draw(st.sampled_from(["step", "cosine", "constant"])),
                        seed=seed, augment=draw(st.booleans()), channels_last=draw(st.booleans()),
                        compile=draw(st.booleans()),
                        n_train=draw(st.one_of(st.none(), st.integers(1, 60000))))
    eps = draw(st.one_of(st.none(), st.floats(0.0, 1.0, allow_nan=False)))
    return RunSpec(model=draw(st.sampled_from(models.names())), data=draw(st.sampled_from(data.NAMES)),
                   policy=policy, defense=defense, defense_config=config, eps=eps, train=train,
                   eval_pgd=draw(st.integers(0, 1000)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_spec_json_round_trip(spec):
    back = RunSpec.from_json(spec.to_json())
    assert back == spec and back.to_dict() == spec.to_dict()
    assert json.loads(spec.to_json())["version"] == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_spec_command_line_round_trip(spec):
    """The command line is one spelling of the spec: `rqlab train` reads back an equal spec."""
    argv = shlex.split(spec.command("runs/x"))
    assert argv[:2] == ["rqlab", "train"]
    assert spec_from_args(build_parser().parse_args(argv[1:])) == spec


def test_spec_fills_settings_and_eps_from_the_data():
    spec = RunSpec(policy="4", defense="pgd-at")
    assert spec.defense_config == {"eps": 0.1, "steps": 7, "step_size": None} and spec.eps == 0.1
    cifar = RunSpec(data="cifar10", defense="odgq", defense_config={"lam": 0.5})
    assert cifar.eps == 8 / 255 and cifar.defense_config == {"eps": 8 / 255, "alpha": None, "lam": 0.5}
    assert RunSpec(policy="4-8", defense="rpt").sbn_bits == (4, 5, 6, 7, 8)
    assert RunSpec(policy="4-8").sbn_bits is None  # RPI without RPT: no switchable BN


@pytest.mark.parametrize("kwargs, message", [
    (dict(policy="33"), "bits=33 is not allowed"),
    (dict(policy="w4a0"), "not allowed"),
    (dict(policy=2.5), "must be a precision policy"),
    (dict(model="resnet9000"), "model='resnet9000' is unknown"),
    (dict(data="imagenet"), "dataset='imagenet'"),
    (dict(defense="magic"), "defense='magic'"),
    (dict(defense="pgd-at", defense_config={"beta": 1e-3}), "no setting beta: its settings are eps, steps, step_size"),
    (dict(defense="rpt-pgd-at", policy="4"), "trains over a precision set"),
    (dict(eps=-0.1), "eps=-0.1"),
    (dict(eps=0.1, defense="pgd-at", defense_config={"eps": 0.2}), "give eps once"),
    (dict(eval_pgd=-1), "eval_pgd=-1"),
    (dict(train={"epochs": 0}), "unknown fields|epochs"),
])
def test_bad_specs_name_the_field(kwargs, message):
    if isinstance(kwargs.get("train"), dict):  # a dict is read as a TrainConfig
        kwargs = {**kwargs, "train": {**TrainConfig().to_dict(), **kwargs["train"]}}
    with pytest.raises(RqlabError, match=message):
        RunSpec(**kwargs)


def test_from_dict_refuses_unknown_fields_and_versions():
    d = RunSpec().to_dict()
    with pytest.raises(RqlabError, match=r"unknown fields \['bitz'\]"):
        RunSpec.from_dict({**d, "bitz": 4})
    with pytest.raises(RqlabError, match="version 1"):
        RunSpec.from_dict({**d, "version": 7})
    with pytest.raises(RqlabError, match="not valid JSON"):
        RunSpec.from_json("{")


@pytest.mark.parametrize("eps", [0.1, 8 / 255, 0.3])
def test_one_pgd_at_step_rule_in_library_cli_and_zoo(eps):
    """eps / 4 everywhere: defenses.build, PGDTraining, `rqlab train`, RunSpec; the zoo's
    PGD-7 recipes at 0.1 and 8/255 (METHODS section 0: 0.025 and 2/255)."""
    library = defenses.build("pgd-at", eps=eps).config()["step_size"]
    direct = PGDTraining(eps=eps).config()["step_size"]
    args = build_parser().parse_args(["train", "--defense", "pgd-at", "--eps", repr(eps)])
    cli = build_hooks(spec_from_args(args)).config()["step_size"]
    assert library == direct == cli == pgd_train_step(eps) == eps / 4
    assert build_hooks(zoo.recipe("fmnist-q4-pgd7-small").spec).config()["step_size"] == 0.025
    assert build_hooks(zoo.recipe("cifar10-preactresnet18-q4-pgd7").spec).config()["step_size"] == 2 / 255
    # given explicitly, it wins
    assert defenses.build("pgd-at", eps=eps, step_size=0.01).config()["step_size"] == 0.01


def synthetic(n: int, seed: int) -> data.Dataset:
    """n random 28x28 images labelled by their mean brightness (learnable), as Fashion-MNIST."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    y = (x.float().mean(dim=(1, 2, 3)) * 10 / 256).long().clamp(0, 9)
    info = data.dataset_info("fashion-mnist")
    return data.Dataset("fashion-mnist", "train", x, y, info.mean, info.std, info.classes)


@pytest.mark.parametrize("policy, defense", [("4", "pgd-at"), ("4,8", "rpt-pgd-at"), ("w32a4", "dq")])
def test_train_gives_the_weights_of_the_hand_assembled_pipeline(policy, defense, tmp_path):
    """rqlab.train(spec) is the pipeline `rqlab train` ran before the experiment layer
    (seed, model, policy, hooks with step 0.025, seeded loader, fit), bit for bit."""
    train_set, test_set = synthetic(96, 0), synthetic(40, 1)
    spec = RunSpec(policy=policy, defense=defense, defense_config={"steps": 2} if "pgd" in defense else {},
                   train=TrainConfig(epochs=2, batch_size=32, device="cpu"))
    model, history = rqlab.train(spec, tmp_path / "run", train_set=train_set, test_set=test_set, progress=False,
                                 log=None)

    pol = quant.parse_policy(policy, seed=0)
    sbn = pol.support() if defense.startswith("rpt") else None
    hooks = {"pgd-at": lambda: PGDTraining(0.1, 2, 0.025, 0),
             "rpt-pgd-at": lambda: defenses.RandomPrecisionTraining(sbn, inner=PGDTraining(0.1, 2, 0.025, 0)),
             "dq": lambda: defenses.DefensiveQuantization(1e-3)}[defense]()
    seed_everything(0)
    ref = models.create("smallcnn", input_shape=(1, 28, 28), mean=train_set.mean, std=train_set.std, sbn_bits=sbn)
    quant.apply(ref, pol)
    fit(ref, data.Loader(train_set, 32, shuffle=True, seed=0), spec.train, hooks=hooks,
        test_loader=data.Loader(test_set, 500), progress=False, log=None)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    assert set(history[0]) >= {"clean_accuracy", "train_loss", "epoch_time_s"}
    assert RunSpec.from_json((tmp_path / "run" / "spec.json").read_text()) == spec


def test_train_resumes_to_the_same_weights(tmp_path):
    train_set, test_set = synthetic(64, 0), synthetic(20, 1)
    # constant lr: a run extended from 1 to 2 epochs follows the 2-epoch run's schedule
    spec = RunSpec(policy="4", defense="fgsm-rs",
                   train=TrainConfig(epochs=2, batch_size=32, device="cpu", schedule="constant"))
    full, _ = rqlab.train(spec, tmp_path / "a", train_set=train_set, test_set=test_set, progress=False, log=None)
    rqlab.train(spec.replace(train={"epochs": 1}), tmp_path / "b", train_set=train_set, test_set=test_set,
                progress=False, log=None)
    resumed, history = rqlab.train(spec, tmp_path / "b", train_set=train_set, test_set=test_set, progress=False,
                                   log=None)
    assert len(history) == 2
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_train_refuses_data_of_another_dataset(tmp_path):
    other = synthetic(8, 0)
    other = data.Dataset("mnist", "train", other.x, other.y, other.mean, other.std, other.classes)
    with pytest.raises(RqlabError, match="train_set is 'mnist' but the spec trains on 'fashion-mnist'"):
        rqlab.train(RunSpec(), None, train_set=other, test_set=other)


def test_load_takes_a_zoo_name_a_file_or_a_run_directory(tmp_path):
    name = zoo.names(trained_only=True)[0] if zoo.names(trained_only=True) else pytest.skip("zoo not built")
    by_name = rqlab.load(name)
    spec = RunSpec(policy="4", train=TrainConfig(epochs=1, batch_size=32, device="cpu"))
    trained, _ = rqlab.train(spec, tmp_path / "run", train_set=synthetic(32, 0), test_set=synthetic(8, 1),
                             progress=False, log=None)
    for where in (tmp_path / "run", tmp_path / "run" / "checkpoint.pt", str(tmp_path / "run" / "checkpoint.pt")):
        loaded = rqlab.load(where)
        assert not loaded.training and quant.current(loaded) == quant.Fixed(4)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))
    assert quant.current(rqlab.load(tmp_path / "run", policy="8")) == quant.Fixed(8)
    assert not by_name.training
    with pytest.raises(RqlabError, match="zoo model 'no-such-model' is unknown"):
        rqlab.load("no-such-model")
    with pytest.raises(RqlabError, match="not an existing checkpoint file"):
        rqlab.load(tmp_path / "nothing.pt")
    with pytest.raises(RqlabError, match="must be a zoo model name"):
        rqlab.load(3)


def test_eval_and_bitselect_take_a_zoo_name(tmp_path, capsys):
    if "fmnist-q4-pgd7-small" not in zoo.names(trained_only=True):
        pytest.skip("zoo not built")
    out = tmp_path / "rec.json"
    assert main(["eval", "--model", "fmnist-q4-pgd7-small", "--attack", "fgsm", "--n", "20", "--json", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    rec = Record.from_json(out.read_text())
    assert rec.model == "fmnist-q4-pgd7-small" and rec.n == 20
    assert rec["checkpoint_sha256"] == zoo.card("fmnist-q4-pgd7-small")["sha256"]


def test_a_new_defense_is_one_registered_factory(tmp_path, monkeypatch):
    """Registering a defense (its hooks and settings) makes it a RunSpec, a `rqlab train`
    flag and a trained model, with nothing else to edit."""
    from rqlab.defenses import registry
    from rqlab.training import Hooks

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class Noise(Hooks):
        name = "noise"

        def __init__(self, sigma, seed):
            self.sigma, self.seed = sigma, seed

        def config(self):
            return {"sigma": self.sigma, "seed": self.seed}

        def batch(self, model, x, y):
            return (x + self.sigma * torch.randn_like(x)).clamp(0, 1), y

    @registry.register("noise", params={"sigma": 0.1}, summary="Gaussian noise augmentation")
    def build_noise(sigma, seed, bits=None):
        return Noise(sigma, seed)

    spec = RunSpec(policy="4", defense="noise", defense_config={"sigma": 0.2},
                   train=TrainConfig(epochs=1, batch_size=32, device="cpu"))
    argv = shlex.split(spec.command())[1:]
    assert "--defense noise --set sigma=0.2" in " ".join(argv)  # a new setting needs no new flag
    assert spec_from_args(build_parser().parse_args(argv)) == spec
    _, history = rqlab.train(spec, tmp_path / "run", train_set=synthetic(64, 0), test_set=synthetic(16, 1),
                             progress=False, log=None)
    from rqlab import checkpoint

    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["hooks"]["config"] == {"sigma": 0.2, "seed": 0}
    with pytest.raises(RqlabError, match="no setting eps: its settings are sigma"):
        RunSpec(defense="noise", defense_config={"eps": 0.1})
