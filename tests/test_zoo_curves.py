"""`rqlab zoo curves`: the full-budget models' held-out curves in one figure, with each built
model's plateau gain and the models still training (their run folder's history) dashed."""
import json

import pytest

from rqlab import zoo
from rqlab.cli import main
from rqlab.report import zoo_curves
from rqlab.validate import RqlabError

BUILT_FULL = [n for n in zoo_curves.full_budget_names() if n in zoo.names(trained_only=True)]


def history(values, key="robust_accuracy"):
    return [{"epoch": i + 1, "clean_accuracy": 0.8, key: v, "epoch_time_s": 1.0} for i, v in enumerate(values)]


def test_full_budget_names_are_the_cpu_recipes_without_small():
    names = zoo_curves.full_budget_names()
    assert "fmnist-q4-pgd7" in names and "fmnist-q4-pgd7-small" not in names
    assert not any(zoo.RECIPES[n].gpu for n in names)


@pytest.mark.skipif(not BUILT_FULL, reason="no full-budget model built")
def test_built_models_read_their_cards_and_judge_the_recipes_key():
    curves = zoo_curves.zoo_curves(BUILT_FULL)
    assert list(curves) == BUILT_FULL and all(c["status"] == "built" for c in curves.values())
    for name, c in curves.items():
        assert c["plateau"] == zoo.plateau(name, tol=zoo.FULL_PLATEAU_TOL)   # the commit check's own figure
        assert c["history"] == zoo.card(name)["history"] and c["device"] == zoo.card(name)["device"]


def test_a_model_still_training_is_read_from_its_run_folder(tmp_path, monkeypatch):
    """An adversarial full-budget model not built yet (made so here, whatever the zoo holds)."""
    name = next(n for n in zoo_curves.full_budget_names() if zoo.recipe(n).spec.defense not in ("natural", "dq"))
    built = [n for n in zoo.names(trained_only=True) if n != name]
    monkeypatch.setattr(zoo, "names", lambda trained_only=False: built)
    (tmp_path / name).mkdir()
    (tmp_path / name / "history.json").write_text(json.dumps(history([0.60, 0.65, 0.70, 0.72, 0.75])))
    assert name not in zoo_curves.zoo_curves([name])                 # without runs: not drawn
    c = zoo_curves.zoo_curves([name], runs=tmp_path)[name]
    assert c["status"] == "training" and c["device"] is None and c["epochs"] == zoo.recipe(name).spec.train.epochs
    assert c["plateau"]["key"] == "robust_accuracy" and c["plateau"]["gain"] == pytest.approx(0.10)
    assert not c["plateau"]["plateaued"]
    assert "training: 5/" in zoo_curves._label(name, c)
    (tmp_path / name / "history.json").write_text("{not json")
    with pytest.raises(RqlabError, match="not a training history"):
        zoo_curves.zoo_curves([name], runs=tmp_path)


def test_figure_names_the_machine_and_refuses_bad_input(tmp_path):
    curves = {"fmnist-fp-pgd7": {"history": history([0.6, 0.7, 0.75, 0.76, 0.76]), "status": "built", "epochs": 5,
                                 "device": "cpu (Some CPU, 1 thread)",
                                 "plateau": zoo.plateau(history([0.6, 0.7, 0.75, 0.76, 0.76]), tol=0.02)},
              "fmnist-fp-natural": {"history": history([0.8, 0.9, 0.91, 0.91], key="clean_accuracy"),
                                    "status": "built", "epochs": 4, "device": "cpu (Some CPU, 1 thread)",
                                    "plateau": zoo.plateau(history([0.8, 0.9, 0.91, 0.91], key="clean_accuracy"),
                                                           key="clean_accuracy")}}
    fig = zoo_curves.curves_figure(curves)
    texts = [t.get_text() for t in fig.texts]
    assert any("trained on cpu (Some CPU, 1 thread)" in t for t in texts)
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert labels == ["fmnist-fp-natural (+11.0 pts in the last 3 epochs)",      # 0.91 over the first epoch's 0.80
                      "fmnist-fp-pgd7 (+6.0 pts in the last 3 epochs)"]          # 0.76 over 0.70
    assert len(fig.axes[2].lines) == 1                       # the natural model has no PGD-20 curve drawn
    out = zoo_curves.write_figure(curves, tmp_path / "c.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(RqlabError, match="suffix must be .png, .svg or .pdf"):
        zoo_curves.write_figure(curves, tmp_path / "c.txt")
    assert not (tmp_path / "c.txt").exists()
    with pytest.raises(RqlabError, match="no model to draw"):
        zoo_curves.curves_figure({})
    with pytest.raises(RqlabError, match=r"\['fmnist-nope'\] are not zoo recipes"):
        zoo_curves.zoo_curves(["fmnist-nope"])


@pytest.mark.skipif(not BUILT_FULL, reason="no full-budget model built")
def test_cli_writes_the_figure_and_prints_each_gain(tmp_path, capsys):
    out = tmp_path / "curves.svg"
    assert main(["zoo", "curves", BUILT_FULL[0], "--out", str(out), "--runs", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert f"{BUILT_FULL[0]}: built" in printed and "over the last 3" in printed and out.read_text().startswith("<?xml")
    assert main(["zoo", "curves", "--built-only", "--out", str(out)]) == 0
    assert "training" not in capsys.readouterr().out
