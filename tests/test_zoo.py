"""The model zoo: cards reproduce, checksums are enforced, recipes are valid commands,
and building a (tiny) recipe end to end writes a loadable model and a complete card."""
import json
import shutil

import pytest

from rqlab import data, quant, zoo
from rqlab.cli import build_parser, main
from rqlab.sanity import SanityConfig
from rqlab.validate import RqlabError

TRAINED = zoo.names(trained_only=True)


@pytest.mark.parametrize("name", TRAINED or [pytest.param("none", marks=pytest.mark.skip("zoo not built"))])
def test_every_card_reproduces_its_clean_accuracy(name):
    card = zoo.card(name)
    model = zoo.load(name)
    test = data.load("fashion-mnist", "test", n=zoo.CLEAN_N, seed=0)
    for row in card["eval"]:
        policy = quant.policy_from_dict(row["policy"])
        acc = zoo.clean_accuracy(model, test, policy, row["passes"])
        assert abs(acc - row["clean_accuracy"]) <= 0.02, (name, row["precision"], acc, row["clean_accuracy"])
        assert 0.0 <= row["pgd20_accuracy"] <= 1.0
    assert card["sha256"] and card["recipe"]["command"].startswith("rqlab train")


def store_copy(name, tmp_path, monkeypatch):
    """Point the zoo at a copy of model `name`'s checkpoint and card in tmp_path."""
    if name not in TRAINED:
        pytest.skip("zoo model not built")
    for suffix in (".pt", ".json"):
        shutil.copy(zoo.STORE / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    monkeypatch.setattr(zoo, "STORE", tmp_path)


def test_a_corrupted_checkpoint_is_refused(tmp_path, monkeypatch):
    name = "fmnist-fp-natural"
    store_copy(name, tmp_path, monkeypatch)
    blob = bytearray((tmp_path / f"{name}.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / f"{name}.pt").write_bytes(bytes(blob))
    with pytest.raises(RqlabError, match="does not match its card"):
        zoo.load(name)
    (tmp_path / f"{name}.pt").unlink()
    with pytest.raises(RqlabError, match="missing"):
        zoo.load(name)


def test_unknown_and_unbuilt_names_are_clear(monkeypatch, tmp_path):
    with pytest.raises(RqlabError, match="zoo model 'nope' is unknown"):
        zoo.load("nope")
    monkeypatch.setattr(zoo, "STORE", tmp_path)
    with pytest.raises(RqlabError, match="rqlab zoo build cifar10-wrn34-10-pgd7"):
        zoo.load("cifar10-wrn34-10-pgd7")


def test_every_recipe_is_a_valid_train_command():
    parser = build_parser()
    for r in zoo.RECIPES.values():
        args = parser.parse_args(["train", *r.train])
        quant.parse_policy(args.bits)
        assert r.command.startswith("rqlab train") and r.eval_bits


def test_build_a_tiny_recipe_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(zoo, "STORE", tmp_path / "store")
    monkeypatch.setattr(zoo, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(zoo, "CLEAN_N", 100)
    monkeypatch.setattr(zoo, "PGD_N", 20)
    monkeypatch.setattr(zoo, "CALIBRATE_N", 64)
    tiny = zoo.Recipe("tiny-q4-fgsm-rs", "test recipe",
                      ("--model", "smallcnn", "--n-train", "256", "--epochs", "1", "--bits", "4",
                       "--defense", "fgsm-rs", "--eval-pgd", "16", "--eval-n", "100"), ("4", "8"))
    monkeypatch.setitem(zoo.RECIPES, tiny.name, tiny)
    assert main(["zoo", "build", tiny.name, "--device", "cpu", "--no-progress"]) == 0
    card = json.loads((tmp_path / "store" / f"{tiny.name}.json").read_text())
    assert [r["precision"] for r in card["eval"]] == ["4", "8"] and card["eval"][1]["ptq"]
    assert card["calibrated_bits"] == [2, 3, 5, 6, 7, 8] and card["epochs"] == 1
    assert "pgd20_acc" in card["history"][0] and card["recipe"]["defense"] == "fgsm-rs"
    model = zoo.load(tiny.name)
    assert isinstance(quant.current(model), quant.Fixed) and quant.current(model).bits == 4
    assert main(["zoo", "build", tiny.name]) == 0 and "already built" in capsys.readouterr().out
    assert main(["zoo", "list"]) == 0 and tiny.name in capsys.readouterr().out


@pytest.mark.parametrize("name", TRAINED or [pytest.param("none", marks=pytest.mark.skip("zoo not built"))])
def test_every_card_carries_its_audit_and_the_list_marks_failures(name):
    card = zoo.card(name)
    a = card["audit"]
    assert a["n"] == zoo.AUDIT_N and a["policy"] == card["eval"][0]["policy"]
    assert "square" in a["others"] and {c["check"] for c in a["checks"]} >= {"whitebox_vs_blackbox", "zero_gradient"}
    assert a["strongest_accuracy"] == min([a["pgd20_accuracy"], *a["others"].values()])
    assert a["failed"] == [c["check"] for c in a["checks"] if not c["passed"]]
    assert zoo.audit_cell(card).endswith("!") == bool(a["failed"])
    line = next(l for l in zoo.table().splitlines() if l.startswith(name + " "))
    assert zoo.audit_cell(card) in line


def test_audit_rewrites_only_the_card(tmp_path, monkeypatch, capsys):
    name = "fmnist-q4-natural"
    store_copy(name, tmp_path, monkeypatch)
    before = zoo.card(name)
    blob = (tmp_path / f"{name}.pt").read_bytes()
    a = zoo.audit(name, cfg=SanityConfig(n=12, square_queries=50), log=lambda *_: None)
    after = zoo.card(name)
    assert a["n"] == 12 and after["audit"] == json.loads(json.dumps(a))
    assert {k: v for k, v in after.items() if k != "audit"} == {k: v for k, v in before.items() if k != "audit"}
    assert (tmp_path / f"{name}.pt").read_bytes() == blob and zoo.load(name) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.json", f"{name}.pt"]  # no temporary left
    assert main(["zoo", "audit", "nope"]) == 2
    assert "zoo model 'nope' is unknown" in capsys.readouterr().err
