"""Issue 18: a long evaluation keeps its finished batches, and a rerun resumes from them
(`evaluate(..., resume=PATH)`; `rqlab eval --json OUT` keeps them in OUT.progress) to the
record an uninterrupted run writes, its times aside."""
import copy
import signal

import pytest

from rqlab import checkpoint, data, evaluation, quant
from rqlab.attacks import ThreatModel
from rqlab.evaluation import evaluate
from rqlab.record import Record
from rqlab.validate import RqlabError

from test_bad_inputs import spawn, wait_for

SMOKE = {"n_iter": 2, "n_target_classes": 1, "n_queries": 30, "eot": 2}
TIMES = ("wall_time_s", "time_s", "resumed_batches")


def untimed(value):
    """A record's dict without its times (they differ between runs) and resume counts."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, (list, tuple)):
        return [untimed(v) for v in value]
    return value


CASES = {  # name: evaluate's keyword arguments (n=24 in batches of 8: three batches)
    "quick pgd at 4 bits": dict(threat=ThreatModel("pgd", eps=0.05, steps=5, seed=2), policy=quant.Fixed(4)),
    "quick eot-pgd, random 4..8, 2 passes": dict(
        threat=ThreatModel("eot_pgd", eps=0.05, steps=3, eot=2, seed=2),
        policy=quant.RandomPrecision([4, 6, 8], seed=5), passes=2),
    "standard, smoke budget": dict(threat=ThreatModel("pgd", eps=0.05, steps=3, seed=2), protocol="standard",
                                   options=SMOKE),
}


@pytest.fixture(scope="module")
def model(trained_smallcnn, fmnist_test):
    """The natural SmallCNN, its activation ranges calibrated at 4, 6 and 8 bits."""
    m = copy.deepcopy(trained_smallcnn)
    quant.calibrate(m, [fmnist_test[0][:256]], bits=[4, 6, 8])
    return m.eval()


@pytest.mark.parametrize("case", CASES)
def test_an_interrupted_evaluation_resumes_to_the_uninterrupted_record(case, model, fmnist_test,
                                                                       tmp_path, monkeypatch):
    kw = dict(CASES[case], n=24, batch_size=8, progress=False)
    full = evaluate(model, fmnist_test, **kw)
    path = tmp_path / "eval.progress"
    restart = evaluation._restart_draws

    def interrupt_third_batch(policy, key):
        if key == 2:
            raise KeyboardInterrupt("a kill during the third batch")
        restart(policy, key)

    monkeypatch.setattr(evaluation, "_restart_draws", interrupt_third_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, fmnist_test, resume=path, **kw)
    monkeypatch.setattr(evaluation, "_restart_draws", restart)
    assert path.is_file() and not list(tmp_path.glob(".*.tmp"))  # the two finished batches, complete

    resumed = evaluate(model, fmnist_test, resume=path, **kw)
    assert resumed["resumed_batches"] == 2 and not path.exists()
    assert untimed(resumed.to_dict()) == untimed(full.to_dict())
    # the model was left as it was: its precision and mode
    assert not model.training


def test_a_progress_file_of_another_evaluation_is_refused_not_mixed_in(model, fmnist_test, tmp_path,
                                                                      monkeypatch):
    kw = dict(threat=ThreatModel("pgd", eps=0.05, steps=2, seed=1), n=16, batch_size=8, progress=False)
    path = tmp_path / "eval.progress"
    restart = evaluation._restart_draws
    monkeypatch.setattr(evaluation, "_restart_draws",
                        lambda p, key: (_ for _ in ()).throw(KeyboardInterrupt()) if key == 1 else restart(p, key))
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, fmnist_test, resume=path, **kw)
    monkeypatch.setattr(evaluation, "_restart_draws", restart)
    before = path.read_bytes()
    other = dict(kw, threat=ThreatModel("pgd", eps=0.06, steps=2, seed=1))
    with pytest.raises(RqlabError, match="resume file .* holds another evaluation"):
        evaluate(model, fmnist_test, resume=path, **other)
    with pytest.raises(RqlabError, match="holds another evaluation"):  # other data
        evaluate(model, (fmnist_test[0].flip(0), fmnist_test[1].flip(0)), resume=path, **kw)
    assert path.read_bytes() == before  # kept for the evaluation it belongs to
    path.write_bytes(before[:100])
    with pytest.raises(RqlabError, match="could not be read .* delete it"):
        evaluate(model, fmnist_test, resume=path, **kw)
    path.write_text("{}")
    with pytest.raises(RqlabError, match="could not be read|not an rqlab evaluation progress file"):
        evaluate(model, fmnist_test, resume=path, **kw)
    with pytest.raises(RqlabError, match="resume=.* is a folder"):
        evaluate(model, fmnist_test, resume=tmp_path, **kw)


def test_rqlab_eval_json_killed_with_sigterm_resumes_on_rerun(model, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    checkpoint.save(ckpt, {"model": model.config.to_dict(), "state_dict": model.state_dict(),
                           "policy": quant.Fixed(32).to_dict()})
    threat = ThreatModel("pgd", eps=0.1, steps=100, seed=0)
    argv = ["eval", "--model", ckpt, "--attack", "pgd", "--steps", threat.steps, "--bits", "4", "--n", "48",
            "--batch-size", "8", "--no-progress", "--device", "cpu", "--json"]
    out, progress = tmp_path / "out" / "rec.json", tmp_path / "out" / "rec.json.progress"
    proc = spawn(argv + [out], tmp_path)
    wait_for(progress.is_file, proc, timeout=300)  # the first of six batches is done
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, err[-2000:]
    assert progress.is_file() and not out.exists() and not list(out.parent.glob(".*.tmp"))

    proc = spawn(argv + [out], tmp_path)  # the same command again: it resumes
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and f"resuming from {progress}" in err, err[-2000:]
    assert not progress.exists()
    rec = Record.from_json(out.read_text())
    assert 1 <= rec["resumed_batches"] < 6
    # the outcomes of an uninterrupted evaluation of the same examples
    test = data.load("fashion-mnist", split="test", n=48, seed=0)
    whole = evaluate(model, test, threat, policy=quant.Fixed(4), batch_size=8, progress=False)
    assert rec["per_example"] == whole["per_example"] and rec["robust_accuracy"] == whole["robust_accuracy"]


def test_rqlab_eval_fast_path_options_are_recorded(model, tmp_path, capsys):
    """--arithmetic, --active-set and --channels-last (issue 15's evaluation fast path): the
    record says what ran; bf16 without the hardware is a one-line error before any work."""
    from rqlab.attacks.base import bf16_supported
    from rqlab.cli import main

    ckpt = tmp_path / "checkpoint.pt"
    checkpoint.save(ckpt, {"model": model.config.to_dict(), "state_dict": model.state_dict(),
                           "policy": quant.Fixed(32).to_dict()})
    argv = ["eval", "--model", str(ckpt), "--attack", "pgd", "--steps", "3", "--bits", "4", "--n", "16",
            "--no-progress", "--device", "cpu", "--json"]
    assert main(argv + [str(tmp_path / "a.json"), "--active-set", "--channels-last"]) == 0
    rec = Record.from_json((tmp_path / "a.json").read_text())
    assert rec["attack_settings"] == {"arithmetic": "fp32", "active_set": True} and rec["channels_last"] is True
    code = main(argv + [str(tmp_path / "b.json"), "--arithmetic", "bf16"])
    if bf16_supported("cpu"):
        assert code == 0
        rec_bf16 = Record.from_json((tmp_path / "b.json").read_text())
        assert rec_bf16["attack_settings"]["arithmetic"] == "bf16"
        assert rec_bf16["clean_accuracy"] == rec["clean_accuracy"]  # final scores stay fp32
    else:
        assert code == 2 and "arithmetic='bf16' needs CUDA" in capsys.readouterr().err
        assert not (tmp_path / "b.json").exists()
