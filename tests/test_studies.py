"""The studies (rqlab.studies): each Params mirrors its notebook's parameters cell (same
names, same defaults, parsed from the committed notebook so the two cannot drift), bad
values fail at construction naming the field, and runs on tiny inputs give results that
JSON holds."""
from __future__ import annotations

import json

import pytest

from nbsetup import defaults
from rqlab.studies import amplification, bit_selection, common, deployed, double_win, odgq_curves, transferability
from rqlab.validate import RqlabError

STUDIES = {
    "01_precision_transferability": transferability,
    "02_lipschitz_error_amplification": amplification,
    "03_bit_selection": bit_selection,
    "04_odgq_training_curves": odgq_curves,
    "05_double_win_quant": double_win,
    "06_deployed_int8": deployed,
}

# (study, bad parameters, the message's start): the field, the value, what is allowed
BAD = [
    (transferability, {"bits": [4]}, "bits=[4]: a transfer matrix needs at least two precisions"),
    (transferability, {"bits": [4, 0]}, "bits=0 is not allowed"),
    (transferability, {"model": "fmnist-no-such-model"}, "model: zoo model 'fmnist-no-such-model' is unknown"),
    (transferability, {"eot": -1}, "eot=-1 is out of range"),
    (transferability, {"attack": "square"}, "attack='square'"),
    (transferability, {"eps": 0.0}, "eps=0.0 is out of range"),
    (transferability, {"n_examples": 10001}, "n_examples=10001 is out of range"),
    (transferability, {"device": "tpu"}, "device='tpu'"),
    (transferability, {"interactive": "yes"}, "interactive='yes' must be True or False"),
    (amplification, {"fp_model": "no/such.pt"}, "fp_model='no/such.pt' is not an existing checkpoint file"),
    (amplification, {"craft_on": "DQ"}, "craft_on='DQ'"),
    (amplification, {"betas": [0.0, -1.0]}, "betas[1]=-1.0 is out of range"),
    (amplification, {"beta": -0.1}, "beta=-0.1 is out of range"),
    (amplification, {"train_n": 0}, "train_n=0 is out of range"),
    (amplification, {"epochs": 0}, "epochs=0 is out of range"),
    (amplification, {"eps_curve": [0.03, -0.1]}, "eps_curve[1]=-0.1 is out of range"),
    (amplification, {"eps_curve": [0.0]}, "eps_curve[0]=0.0 is out of range"),
    (bit_selection, {"bits": [1, 4]}, "binary layers have no activation range"),
    (bit_selection, {"budgets": [1.0, 4.0]}, "budgets=[1.0, 4.0]: 1 is below the cheapest allocation"),
    (bit_selection, {"budgets": []}, "budgets is empty"),
    (bit_selection, {"methods": ["lipschitz", "greedy"]}, "methods: 'greedy' is unknown"),
    (bit_selection, {"random_seeds": 0}, "random_seeds=0 is out of range"),
    (bit_selection, {"iters": 0}, "iters=0 is out of range"),
    (odgq_curves, {"bits": [2]}, "bits=[2]: the zoo has the four methods' histories at [1, 4] bits only"),
    (odgq_curves, {"live": "no"}, "live='no' must be True or False"),
    (odgq_curves, {"methods": ["natural", "natural"]}, "repeats an entry"),
    (odgq_curves, {"live": True, "train_n": 60001}, "train_n=60001 is out of range"),
    (double_win, {"model": "no/such/checkpoint.pt"}, "model='no/such/checkpoint.pt' is not an existing checkpoint"),
    (double_win, {"adaptive": ["eot_pgd", "square"]}, "adaptive: 'square' is unknown"),
    (double_win, {"eot": 0}, "eot=0 is out of range"),
    (double_win, {"aa_n_iter": 0}, "aa_n_iter=0 is out of range"),
    (double_win, {"aa_n_examples": 0}, "aa_n_examples=0 is out of range"),
    (deployed, {"bits": [4]}, "bits=[4]: the engine is int8"),
    (deployed, {"square_queries": 0}, "square_queries=0 is out of range"),
    (deployed, {"activations": "int4"}, "activations='int4'"),
    (deployed, {"quantize_edges": "no"}, "quantize_edges='no' must be True or False"),
    (deployed, {"calib_n": 60001}, "calib_n=60001 is out of range"),
]


def plain(v):
    return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v


@pytest.mark.parametrize("stem", list(STUDIES))
def test_params_are_the_notebook_parameters_with_their_defaults(stem):
    study = STUDIES[stem]
    cell = defaults(stem)
    assert list(study.Params.fields()) == list(cell), "same names, in the order of the parameters cell"
    assert {k: plain(v) for k, v in study.Params.defaults().items()} == cell
    params = study.Params()  # the defaults are valid
    assert study.Params.from_namespace({**cell, "unrelated": 1, "eps": 0.2}) == study.Params(eps=0.2)
    assert json.loads(json.dumps(params.to_dict()))["seed"] == 0


@pytest.mark.parametrize("study,bad,message", BAD, ids=[f"{s.__name__.rsplit('.', 1)[1]}-{next(iter(b))}"
                                                       for s, b, _ in BAD])
def test_bad_values_fail_at_construction_naming_the_field(study, bad, message):
    with pytest.raises(RqlabError) as info:
        study.Params(**bad)
    assert str(info.value).startswith(message) or message in str(info.value)


def test_write_results_is_json_in_output_dir(tmp_path):
    params = transferability.Params(output_dir=str(tmp_path / "out"))
    path = common.write_results(params, common.Results({"a": 1.0}, models={"m": object()}))
    assert path == tmp_path / "out" / "results.json" and json.loads(path.read_text()) == {"a": 1.0}


def test_transferability_run_on_a_tiny_model(tiny):
    path = tiny("fp")  # a stand-in SmallCNN with activation ranges for 2..8
    params = transferability.Params(model=[path], bits=[4, 32], eot=2, passes=2, steps=2, n_examples=16,
                                    device="cpu", interactive=False)
    results = transferability.run(params, log=None)
    ((label, tm),) = results["models"].items()
    assert tm["row_labels"] == ["4", "fp", "eot"] and tm["col_labels"] == ["4", "fp", "rpi"] and tm["n"] == 16
    assert results["gap"][label] == pytest.approx(results["off_diagonal_mean"][label]
                                                  - results["diagonal_mean"][label])
    assert f"{label}:" in transferability.reading(results) and set(results.models) == {label}
    json.dumps(results)


def test_amplification_eps_curve_is_sorted_once_and_may_be_empty():
    assert amplification.Params(eps_curve=[0.1, 0.03, 0.1]).eps_curve == (0.03, 0.1)
    assert amplification.Params(eps_curve=[]).eps_curve == ()
    assert amplification.plot_eps({"accuracy_vs_eps": {}}) is None


def test_amplification_sweep_betas_add_beta_once():
    assert amplification.Params(beta=0.001, betas=[0.01, 0.0, 0.001]).sweep_betas == [0.0, 0.001, 0.01]
    assert amplification.Params(beta=0.0, betas=[]).sweep_betas == [0.0]


def test_amplification_beta_sweep_from_trained_models(tiny):
    """sweep_models: the sweep's rows are the given models, betas read from their
    checkpoints (natural = 0, dq = its beta), measured like the live sweep's; nothing trains."""
    from rqlab.analysis import sweeps

    a4, dq, fp = tiny("a4"), tiny("dq"), tiny("fp")  # stand-ins: natural w32a4, DQ beta 3e-3, natural FP
    assert amplification.trained_beta(a4) == 0.0 and amplification.trained_beta(dq) == 0.003
    params = amplification.Params(model=dq, fp_model=fp, vanilla_model=a4, bits=[4, 32], steps=2, n_examples=16,
                                  sweep_models=[dq, a4], beta=0.003, device="cpu", interactive=False)
    results = amplification.run(params, log=None)
    assert results["beta_source"] == "models"
    assert [(r["beta"], r["model"]) for r in results["beta_sweep"]] == [(0.0, a4), (0.003, dq)]
    assert results["beta_row"]["beta"] == 0.003 and "DQ beta=0.003" in results.models
    # the same row as measuring that model directly (no training in between)
    from rqlab import quant, zoo
    inputs = amplification.load_inputs(params)
    direct = sweeps.beta_row(0.003, zoo.load(dq), (inputs.x, inputs.y), params.threat(), quant.parse_policy("w32a4"))
    assert {k: v for k, v in results["beta_sweep"][1].items() if k != "model"} == direct
    assert "(" + a4 + ")" in amplification.beta_reading(results)
    json.dumps(results)
    with pytest.raises(RqlabError, match="beta=0.01 is none of the sweep models' betas: choose one of 0, 0.003"):
        amplification.run(amplification.Params(**{**params.to_dict(), "beta": 0.01}), log=None)
    with pytest.raises(RqlabError, match="both trained with beta=0"):
        amplification.run(amplification.Params(**{**params.to_dict(), "sweep_models": [a4, fp], "beta": 0.0}),
                          log=None)
    with pytest.raises(RqlabError, match="sweep_models="):
        amplification.Params(sweep_models=a4)
    with pytest.raises(RqlabError, match=r"sweep_models\[0\]"):
        amplification.Params(sweep_models=["no/such.pt"])


def test_double_win_policies_and_reduced_autoattack():
    p = double_win.Params(bits=[4, 8], aa_n_iter=10)
    assert str(p.policies()["FP"]) == "fp" and p.policies()["RPI"].choices == (4, 8) and p.aa_reduced
    assert not double_win.Params(adaptive=[], aa_n_iter=10).aa_reduced
