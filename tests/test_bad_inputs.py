"""Bad inputs, kills and reruns (issues 18 and 19): every case gets a one-line answer that
names the flag or field, no traceback, and no finished result is lost.

The tables hold the cases; each row says what is run and what the answer must contain.
Models are tiny (SmallCNN trained for one step on 128 images), evaluations use a few
examples, and the report uses notebooks without torch, so the file runs in about a minute.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch

from rqlab import checkpoint, data, quant, zoo
from rqlab.attacks import ThreatModel, pgd
from rqlab.cli import main
from rqlab.evaluation import evaluate
from rqlab.experiment import DEFAULT_TRAIN, RunSpec, train
from rqlab.validate import RqlabError

ROOT = Path(__file__).resolve().parents[1]
TINY = replace(DEFAULT_TRAIN, epochs=1, n_train=128, eval_n=64)
TRAIN = ["train", "--n-train", "128", "--eval-n", "64", "--epochs", "1", "--no-progress"]
EVAL = ["eval", "--attack", "pgd", "--n", "4", "--steps", "2", "--no-progress"]  # the quick protocol: one attack


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `rqlab ARGV` run in this process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def spawn(argv: list[str], cwd: Path, **kw) -> subprocess.Popen:
    """`python -m rqlab ARGV` in its own process group (so a kill reaches its kernels too)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RQLAB_LOG_DIR": str(cwd / "logs")}
    return subprocess.Popen([sys.executable, "-m", "rqlab", *map(str, argv)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=_default_sigint, **kw)


def _default_sigint() -> None:
    """In the child: SIGINT back to its default. A suite started as a shell's background job
    (`make test &`) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt;
    a user's terminal, where Ctrl-C is pressed, does not ignore it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def children(pid: int) -> list[int]:
    """The processes `pid` started (e.g. a report's Jupyter kernel), from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def kill_tree(proc: subprocess.Popen, sig: int) -> None:
    """SIGTERM to the command; SIGKILL to its process group and to the kernels it started,
    which jupyter_client puts in sessions of their own (they would outlive a killed report)."""
    kernels = [k for c in children(proc.pid) for k in [c, *children(c)]]
    if sig != signal.SIGKILL:  # `kill PID`: rqlab shuts its kernel down itself
        os.kill(proc.pid, sig)
    else:
        os.killpg(proc.pid, sig)
        for pid in kernels:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0, poll: float = 0.1) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the command ended (rc {proc.returncode}) before the kill: {proc.stderr.read()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("timed out waiting for the moment to kill")
        time.sleep(poll)


def assert_one_line_answer(code: int, out: str, err: str, code_expected: int, *needles: str) -> None:
    text = out + err
    assert code == code_expected, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err[-2000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny trained run directories: fp, 4 bits, random 4-8 (one SGD step each)."""
    base = tmp_path_factory.mktemp("runs")
    for name, policy in (("fp", "fp"), ("q4", 4), ("r48", "4-8")):
        train(RunSpec(policy=policy, train=TINY), base / name, progress=False, log=None)
    return base


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RQLAB_LOG_DIR", str(tmp_path / "logs"))
    (tmp_path / "afile.txt").write_text("mine\n")
    (tmp_path / "adir").mkdir()
    return tmp_path


# ---- 1, 2: output locations checked before any work ----------------------------------------

# (argv, flag named in the error, what the error says); {runs} is the tiny runs' folder
BAD_OUTPUTS = [
    (TRAIN + ["--out", "afile.txt"], "--out", "is an existing file"),
    (TRAIN + ["--out", "afile.txt/sub"], "--out", "afile.txt is a file"),
    (EVAL + ["--checkpoint", "{runs}/q4", "--json", "adir"], "--json", "is a folder"),
    (EVAL + ["--checkpoint", "{runs}/q4", "--json", "afile.txt/record.json"], "--json", "afile.txt is a file"),
    (EVAL + ["--checkpoint", "{runs}/q4", "--json", "afile.txt/deeper/record.json"], "--json", "is a file"),
    (["bitselect", "--model", "{runs}/q4", "--budget", "4", "--json", "adir"], "--json", "is a folder"),
    (["bitselect", "--model", "{runs}/q4", "--budget", "4", "--json", "afile.txt/b.json"], "--json", "is a file"),
    (["report", "--out", "afile.txt"], "--out", "is an existing file"),
]


@pytest.mark.parametrize("argv, flag, message", BAD_OUTPUTS, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in BAD_OUTPUTS])
def test_a_bad_output_location_fails_before_any_work(runs, workdir, capsys, argv, flag, message):
    code, out, err = run_cli(capsys, [a.format(runs=runs) for a in argv])
    assert_one_line_answer(code, out, err, 2, f"{flag}=", message)
    assert "accuracy" not in out and "epoch" not in out   # nothing ran
    assert (workdir / "afile.txt").read_text() == "mine\n" and not any((workdir / "adir").iterdir())
    assert sorted(p.name for p in workdir.iterdir()) == ["adir", "afile.txt"]  # nothing created


def test_a_json_record_in_a_missing_folder_is_written_there(runs, workdir, capsys):
    code, out, err = run_cli(capsys, EVAL + ["--checkpoint", runs / "q4", "--json", "new/deeper/r.json"])
    assert_one_line_answer(code, out, err, 0)
    record = json.loads((workdir / "new/deeper/r.json").read_text())
    assert record["n"] == 4 and len(record["per_example"]["robust"]) == 4


def test_output_checks_name_the_field_in_python():
    with pytest.raises(RqlabError, match="out_dir="):
        checkpoint.check_output_dir(__file__, "out_dir")
    with pytest.raises(RqlabError, match="record="):
        checkpoint.check_output_file(Path(__file__).parent, "record")


# ---- 10, 11: messages name the flag the user typed; checkpoints in every spelling ------------

WRONG_FLAG = [  # (argv, flag the error must name)
    (["train", "--n-train", "100000"], "--n-train=100000"),
    (["train", "--eval-n", "0"], "--eval-n=0"),
    (["train", "--lr", "nan"], "--lr=nan"),
    (["train", "--batch-size", "0"], "--batch-size=0"),
    (["train", "--epochs", "0"], "--epochs=0"),
    (EVAL + ["--checkpoint", "{runs}/q4", "--calibrate", "-5"], "--calibrate=-5"),
    (EVAL[:1] + ["--checkpoint", "{runs}/q4", "--n", "100000"], "--n=100000"),
    (EVAL + ["--checkpoint", "{runs}/q4", "--batch-size", "0"], "--batch-size=0"),
    (["bitselect", "--model", "{runs}/q4", "--budget", "4", "--calibrate", "-1"], "--calibrate=-1"),
    (["bitselect", "--model", "{runs}/q4", "--budget", "4", "--kind", "watts"], "--kind="),
    (["train", "--data", "cifar10", "--data-root", "{empty}", "--n-train", "10"], "--data-root DIR"),
    (EVAL + ["--checkpoint", "{runs}/nothing-here"], "model="),
]


@pytest.mark.parametrize("argv, needle", WRONG_FLAG, ids=[c[1] for c in WRONG_FLAG])
def test_messages_name_the_flag(runs, workdir, capsys, argv, needle):
    (workdir / "empty").mkdir()
    code, out, err = run_cli(capsys, [a.format(runs=runs, empty=workdir / "empty") for a in argv])
    assert_one_line_answer(code, out, err, 2, needle)
    assert "--root " not in err and " n=" not in err


@pytest.mark.parametrize("spelling", ["{runs}/q4", "{runs}/q4/checkpoint.pt"])
def test_a_checkpoint_is_a_run_directory_or_its_file(runs, workdir, capsys, spelling):
    code, out, err = run_cli(capsys, EVAL + ["--checkpoint", spelling.format(runs=runs)])
    assert_one_line_answer(code, out, err, 0)
    assert "robust" in out


def test_zoo_load_takes_a_path_and_a_name(runs):
    assert quant.current(zoo.load(runs / "q4")) == quant.Fixed(4)
    assert quant.current(zoo.load(str(runs / "q4" / "checkpoint.pt"))) == quant.Fixed(4)
    with pytest.raises(RqlabError, match="zoo model 'no-such-model' is unknown: choose one of"):
        zoo.load("no-such-model")


# ---- 12: the Python API answers in its own words -------------------------------------------

def test_random_precision_of_one_int_names_the_field():
    with pytest.raises(RqlabError, match=r"choices=4 .*collection of bit-widths"):
        quant.RandomPrecision(4)
    assert quant.RandomPrecision(range(4, 9)).support() == (4, 5, 6, 7, 8)


def test_float64_inputs_are_converted(runs):
    model = zoo.load(runs / "fp")
    ds = data.load("fashion-mnist", "test", n=6)
    x, y = ds.x.double() / 255, ds.y
    threat = ThreatModel("pgd", eps=0.1, steps=3)
    x_adv = pgd(model, x, y, threat)
    assert x_adv.dtype == torch.float32 and (x_adv.double() - x).abs().max() <= 0.1 + 1e-6
    assert torch.equal(x_adv, pgd(model, x.float(), y, threat))
    assert evaluate(model, (x, y), threat, progress=False)["robust_accuracy"] == \
        evaluate(model, (x.float(), y), threat, progress=False)["robust_accuracy"]


def test_an_empty_batch(runs):
    model = zoo.load(runs / "fp")
    x, y = torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)
    assert pgd(model, x, y, ThreatModel("pgd", eps=0.1, steps=2)).shape == (0, 1, 28, 28)
    with pytest.raises(RqlabError, match="no examples"):
        evaluate(model, (x, y), ThreatModel("pgd", eps=0.1), progress=False)


# ---- 7, 8, 9: warnings where results would mislead -------------------------------------------

def test_uncalibrated_precision_is_calibrated_with_a_warning_and_recorded(runs, workdir, capsys):
    for run, bits in (("q4", "3"), ("fp", "2")):
        code, out, err = run_cli(capsys, EVAL + ["--checkpoint", runs / run, "--bits", bits, "--json", "r.json"])
        assert_one_line_answer(code, out, err, 0, f"no activation ranges for {bits} bits", "--calibrate N")
        calibration = json.loads((workdir / "r.json").read_text())["extra"]["calibration"]
        assert calibration == {"n": 512, "bits": [int(bits)], "split": "train", "seed": 0, "automatic": True}
    # ranges the checkpoint has: no calibration, no warning
    code, out, err = run_cli(capsys, EVAL + ["--checkpoint", runs / "q4", "--json", "r.json"])
    assert_one_line_answer(code, out, err, 0)
    assert "activation ranges" not in err and json.loads((workdir / "r.json").read_text())["extra"]["calibration"] is None


def test_autoattack_on_a_random_policy_warns_before_it_runs_and_flags_the_record(runs, workdir, capsys):
    code, out, err = run_cli(capsys, EVAL + ["--checkpoint", runs / "q4", "--random-bits", "4-8", "--calibrate", "64",
                                             "--attack", "autoattack", "--json", "r.json"])
    assert_one_line_answer(code, out, err, 0, "rqlab: warning: unreliable: random-forward")
    assert json.loads((workdir / "r.json").read_text())["unreliable"][0].startswith("random-forward")
    assert "UNRELIABLE" in out


def test_sanity_failure_is_said_in_the_table_and_strict_exits_non_zero(runs, workdir, capsys):
    argv = EVAL + ["--checkpoint", runs / "r48", "--calibrate", "64", "--sanity"]
    code, out, err = run_cli(capsys, argv + ["--strict"])
    assert_one_line_answer(code, out, err, 3, "sanity check random_forward failed", "--strict")
    assert "SANITY: 1 of 5 checks FAILED (random_forward)" in out
    assert "randomized defense" not in out + err         # AutoAttack was not asked for
    assert "warnings.warn" not in err and "SanityWarning" not in err  # one line, no source line
    code, out, err = run_cli(capsys, argv)
    assert code == 0 and "SANITY: 1 of 5 checks FAILED" in out   # without --strict: said, not an error


# ---- 5, 6: Ctrl-C in training; temp files of killed writers ---------------------------------

def test_ctrl_c_in_training_says_which_checkpoint_is_kept_and_resume_finishes(workdir):
    # 8 short epochs: the SIGINT lands mid-run even when a loaded machine delays this process's polling
    epochs = 8
    argv = ["train", "--n-train", "1024", "--eval-n", "64", "--epochs", str(epochs), "--no-progress", "--out", "run"]
    proc = spawn(argv, workdir)
    wait_for(lambda: (workdir / "run" / "history.json").is_file(), proc, poll=0.02)  # epoch 1 saved
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [line for line in err.splitlines() if line.startswith("rqlab:")]
    assert len(lines) == 1 and "run/checkpoint.pt is kept (epoch" in lines[0] and "to resume" in lines[0]
    done = len(json.loads((workdir / "run" / "history.json").read_text()))
    assert done < epochs and f"epoch {done}/{epochs} finished" in lines[0]
    # a killed save leaves a temp file: the next start removes it (its writer is gone)
    stale = workdir / "run" / ".checkpoint.pt.999999999.abcd1234.tmp"
    stale.write_bytes(b"partial")
    proc = spawn(argv, workdir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert f"resuming {Path('run') / 'checkpoint.pt'} after epoch {done}/{epochs}" in out
    assert not stale.exists() and len(json.loads((workdir / "run" / "history.json").read_text())) == epochs


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(workdir):
    argv = ["train", "--n-train", "1024", "--eval-n", "64", "--epochs", "3", "--no-progress", "--bits", "4"]
    proc = spawn(argv + ["--out", "killed"], workdir)
    wait_for(lambda: (workdir / "killed" / "history.json").is_file(), proc)  # epoch 1 saved
    time.sleep(0.5)  # into epoch 2
    kill_tree(proc, signal.SIGKILL)
    proc.communicate(timeout=60)
    for out in ("killed", "whole"):  # resume the killed run; train another without a break
        proc = spawn(argv + ["--out", out], workdir)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    killed, whole = (checkpoint.load(workdir / out / "checkpoint.pt") for out in ("killed", "whole"))
    assert killed["epoch"] == whole["epoch"] == 3
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, killed["state_dict"][key]), key
    assert not [p.name for p in (workdir / "killed").iterdir() if p.name.endswith(".tmp")]  # swept at the restart


def test_sweep_removes_only_temp_files_of_dead_writers(tmp_path):
    dead = [".checkpoint.pt.999999999.abcd1234.tmp", ".alpha.999999999.x_y1z2w3.ipynb"]
    alive = [f".history.json.{os.getpid()}.abcd1234.tmp", f".alpha.{os.getppid()}.abcd1234.ipynb"]
    others = ["checkpoint.pt", ".hidden", "notes.tmp", ".a.b.tmp"]
    for name in dead + alive + others:
        (tmp_path / name).write_text("x")
    assert sorted(p.name for p in checkpoint.sweep_temp(tmp_path)) == sorted(dead)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(alive + others)


def test_an_unexpected_error_is_one_line_with_a_log(workdir, capsys, monkeypatch):
    from rqlab.cli import train as train_cmd

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train_cmd, "spec_from_args", broken)
    code, out, err = run_cli(capsys, ["train"])
    assert_one_line_answer(code, out, err, 1, "unexpected error: ZeroDivisionError: a bug (traceback in ")
    assert len(err.strip().splitlines()) == 1
    log = Path(err.split("traceback in ")[1].split(";")[0])
    assert log.parent == workdir / "logs" and "Traceback" in log.read_text() and "rqlab train" in log.read_text()


# ---- 3, 4: reruns, --only and kills keep every finished run ----------------------------------

nbformat = pytest.importorskip("nbformat")
yaml = pytest.importorskip("yaml")


def write_notebook(path: Path) -> None:
    """A notebook of the report's contract that can be slowed down (`pause` seconds)."""
    params = nbformat.v4.new_code_cell('output_dir = "."\nscale = 1.0\npause = 0.0')
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook()
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import json, pathlib, time\ntime.sleep(pause)\n"
        'pathlib.Path(output_dir, "results.json").write_text(json.dumps({"acc": 0.5 * scale}))')]
    nbformat.write(nb, path)


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def assert_index_agrees(out: Path, expected: dict[str, float], in_progress: bool) -> None:
    """summary.json and index.html list exactly the expected runs, each ok, with its numbers
    in its folder and every link pointing at an existing file."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["in_progress"] is in_progress
    assert {r["run_id"]: r["results"]["acc"] for r in summary["runs"]} == expected
    for r in summary["runs"]:
        assert r["status"] == "ok" and (out / r["files"]["notebook"]).is_file()
        assert json.loads((out / r["run_id"] / "results.json").read_text())["acc"] == expected[r["run_id"]]
    parser = Links()
    parser.feed((out / "index.html").read_text())
    for url in parser.urls:
        assert (out / unquote(url)).is_file(), url
    index = (out / "index.html").read_text()
    assert all(run_id in index for run_id in expected) and ("IN PROGRESS" in index) is in_progress


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_rerun_only_and_kill_keep_every_finished_run(tmp_path, kill):
    pytest.importorskip("papermill")
    (tmp_path / "nb").mkdir()
    write_notebook(tmp_path / "nb" / "alpha.ipynb")
    runs = [{"notebook": "alpha", "grid": {"scale": [2.0, 3.0]}}]
    config = {"notebooks_dir": "nb", "default_profile": "quick", "profiles": {"quick": {}}, "runs": runs}
    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(config))
    config["runs"] = [{**runs[0], "params": {"pause": 30.0}}]  # the same run-ids, slow
    (tmp_path / "slow.yaml").write_text(yaml.safe_dump(config))
    report = ["report", "--out", "out"]
    both = {"alpha__scale=2": 1.0, "alpha__scale=3": 1.5}

    proc = spawn(report + ["--config", "fast.yaml"], tmp_path)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    out = tmp_path / "out"
    assert_index_agrees(out, both, in_progress=False)

    # --only one run, killed while its notebook runs: the other run and the old results stay
    proc = spawn(report + ["--config", "slow.yaml", "--only", "alpha__scale=2"], tmp_path)
    staging = out / ".alpha__scale=2.new"
    wait_for(lambda: staging.is_dir() and any(staging.glob(".alpha.*.ipynb")), proc)
    time.sleep(2)  # the kernel runs the notebook
    kill_tree(proc, kill)
    _, err = proc.communicate(timeout=60)
    if kill == signal.SIGTERM:
        assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
        assert not staging.exists()   # the interrupted run's folder is gone, the index final
    assert_index_agrees(out, both, in_progress=kill == signal.SIGKILL)

    # the same --only rerun (forced: its finished run would be kept), not killed: the other run is
    # still listed, nothing half-written is left
    proc = spawn(report + ["--config", "fast.yaml", "--only", "alpha__scale=2", "--force"], tmp_path)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    assert_index_agrees(out, both, in_progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["alpha__scale=2", "alpha__scale=3", "index.html",
                                                     "summary.json"]
    assert not list(out.rglob(".alpha.*.ipynb")) and not list(out.rglob("*.tmp"))


# ---- issue 18: notebook and zoo outputs checked first; the last good checkpoint ------------

def test_a_notebooks_output_dir_is_checked_when_its_parameters_are(workdir):
    from rqlab.studies import transferability

    for bad, message in (("afile.txt", "is an existing file"), ("afile.txt/out", "afile.txt is a file")):
        with pytest.raises(RqlabError, match=f"output_dir='{bad}' .*{message}"):
            transferability.Params(output_dir=bad)
    assert transferability.Params(output_dir="new/out").output_dir == "new/out"
    assert not (workdir / "new").exists()  # checked, not created


def test_zoo_build_checks_its_runs_folder_before_training(workdir, capsys):
    (workdir / "runs").write_text("a file where runs/zoo should go\n")
    code, out, err = run_cli(capsys, ["zoo", "build", "fmnist-fp-natural-small"])
    assert_one_line_answer(code, out, err, 2, "zoo runs folder", "is a file")
    code, out, err = run_cli(capsys, ["zoo", "build", "no-such-recipe"])
    assert_one_line_answer(code, out, err, 2, "zoo model 'no-such-recipe' is unknown")


def test_a_corrupt_newest_checkpoint_falls_back_to_the_last_good_one(tmp_path):
    spec = RunSpec(policy=4, train=replace(TINY, epochs=2))
    model, _ = train(spec, tmp_path, progress=False, log=None)
    assert checkpoint.load(tmp_path / "checkpoint.prev.pt")["epoch"] == 1
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 2
    with open(tmp_path / "checkpoint.pt", "r+b") as f:  # the newest is truncated
        f.truncate(1000)
    lines = []
    again, history = train(spec, tmp_path, progress=False, log=lines.append)
    assert any(line.startswith(f"warning: {tmp_path / 'checkpoint.pt'} is not usable") and "checkpoint.prev.pt" in
               line for line in lines), lines
    assert f"resuming {tmp_path / 'checkpoint.prev.pt'} after epoch 1/2" in lines
    assert len(history) == 2 and checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 2
    for key, value in model.state_dict().items():  # epoch 2 trained again: the same weights
        assert torch.equal(value, again.state_dict()[key]), key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt", "history.json",
                                                          "spec.json"]


# ---- issue 18's matrix: the Python API answers bad values with RqlabError naming them ----------

X4 = torch.rand(4, 1, 28, 28)
Y4 = torch.tensor([0, 1, 2, 3])
PGD2 = ThreatModel("pgd", eps=0.1, steps=2)

API_CASES = [  # (id, call(model), regex the RqlabError must match)
    ("nan input", lambda m: pgd(m, X4.masked_fill(X4 > 0.9, float("nan")), Y4, PGD2), r"x contains NaN"),
    ("inf input", lambda m: pgd(m, X4.masked_fill(X4 > 0.9, float("inf")), Y4, PGD2), r"x has values in .*\[0, 1\]"),
    ("normalised input", lambda m: pgd(m, X4 * 4 - 2, Y4, PGD2), r"x has values in .*do not pass mean/std"),
    ("uint8 input to an attack", lambda m: pgd(m, (X4 * 255).byte(), Y4, PGD2), r"x has dtype torch.uint8"),
    ("wrong shape", lambda m: pgd(m, X4[:, :, :20], Y4, PGD2), r"x has shape \(4, 1, 20, 28\).*\(B, 1, 28, 28\)"),
    ("3-d input", lambda m: pgd(m, X4[:, 0], Y4, PGD2), r"x has shape \(4, 28, 28\)"),
    ("label out of range", lambda m: pgd(m, X4, Y4 + 7, PGD2), r"y has labels in \[7, 10\]: use 0..9"),
    ("negative label", lambda m: pgd(m, X4, Y4 - 1, PGD2), r"y has labels in \[-1, 2\]"),
    ("float labels", lambda m: pgd(m, X4, Y4.float(), PGD2), r"y must be a 1-D integer tensor"),
    ("mismatched lengths", lambda m: pgd(m, X4, Y4[:3], PGD2), r"y has 3 labels but x has 4 images"),
    ("evaluate: mismatched lengths", lambda m: evaluate(m, (X4, Y4[:3]), PGD2, progress=False),
     r"data has 4 images but 3 labels"),
    ("evaluate: n larger than the data", lambda m: evaluate(m, (X4, Y4), PGD2, n=5, progress=False),
     r"n=5 is more than the 4 examples"),
    ("evaluate: passes 0", lambda m: evaluate(m, (X4, Y4), PGD2, passes=0, progress=False), r"passes=0"),
    ("data.load: n larger than the split", lambda m: data.load("fashion-mnist", "test", n=10**6),
     r"n=1000000 is out of range: use an integer in \[1, 10000\]"),
    ("data.load: unknown split", lambda m: data.load("fashion-mnist", "valid"), r"split='valid'"),
    ("eps out of range", lambda m: ThreatModel("pgd", eps=1.5), r"eps=1.5"),
    ("eps nan", lambda m: ThreatModel("pgd", eps=float("nan")), r"eps=nan"),
    ("unknown attack", lambda m: ThreatModel("pgd2"), r"attack='pgd2'"),
    ("bits out of range", lambda m: quant.Fixed(33), r"bits=33 is not allowed"),
    ("bits set out of range", lambda m: quant.RandomPrecision((4, 17)), r"choices=17|bits=17|choices"),
    ("bits set repeated", lambda m: quant.RandomPrecision((4, 4)), r"repeats a bit-width"),
    ("bits set empty", lambda m: quant.RandomPrecision(()), r"choices is empty"),
    ("bad policy spelling", lambda m: quant.parse_policy("4-2"), r"4-2"),
]


@pytest.mark.parametrize("call, match", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_the_python_api_names_the_bad_value(runs, call, match):
    model = zoo.load(runs / "fp")
    with pytest.raises(RqlabError, match=match):
        call(model)


def test_an_unsorted_bits_set_is_the_sorted_one():
    assert quant.RandomPrecision((8, 4, 6)) == quant.RandomPrecision((4, 6, 8))


REPORT_CONFIGS = [  # (id, change to a valid config, what the error names)
    ("typo'd top-level key", {"profile": {"quick": {}}}, "profile"),
    ("typo'd run key", {"runs": [{"notebok": "alpha"}]}, "notebok"),
    ("wrong type", {"runs": [{"notebook": "alpha", "params": {"scale": "big"}}]}, "scale"),
    ("unknown notebook", {"runs": [{"notebook": "gamma"}]}, "gamma"),
    ("parameter the notebook lacks", {"runs": [{"notebook": "alpha", "params": {"sclae": 2.0}}]}, "sclae"),
]


@pytest.mark.parametrize("change, needle", [c[1:] for c in REPORT_CONFIGS], ids=[c[0] for c in REPORT_CONFIGS])
def test_a_bad_report_config_fails_before_anything_runs(workdir, capsys, change, needle):
    (workdir / "nb").mkdir()
    write_notebook(workdir / "nb" / "alpha.ipynb")
    config = {"notebooks_dir": "nb", "default_profile": "quick", "profiles": {"quick": {}},
              "runs": [{"notebook": "alpha"}], **change}
    (workdir / "c.yaml").write_text(yaml.safe_dump(config))
    code, out, err = run_cli(capsys, ["report", "--config", "c.yaml", "--out", "out"])
    assert_one_line_answer(code, out, err, 2, needle)
    assert not (workdir / "out").exists()


def test_an_unknown_report_profile_names_the_choices(workdir, capsys):
    (workdir / "nb").mkdir()
    write_notebook(workdir / "nb" / "alpha.ipynb")
    config = {"notebooks_dir": "nb", "default_profile": "quick", "profiles": {"quick": {}},
              "runs": [{"notebook": "alpha"}]}
    (workdir / "c.yaml").write_text(yaml.safe_dump(config))
    code, out, err = run_cli(capsys, ["report", "--config", "c.yaml", "--out", "out", "--profile", "ful"])
    assert_one_line_answer(code, out, err, 2, "ful", "quick")
    assert not (workdir / "out").exists()


# ---- issue 18's property tests: any generated value validates or raises RqlabError -------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rqlab.report import config as report_config  # noqa: E402

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                      max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(attack=st.one_of(st.sampled_from(["pgd", "fgsm", "eot-pgd", "autoattack", "square", "cw"]), SCALARS),
       norm=st.one_of(st.sampled_from(["linf", "l2"]), SCALARS),
       eps=st.one_of(st.floats(-1, 200), SCALARS), steps=st.one_of(st.integers(-3, 50), SCALARS),
       step_size=st.one_of(st.floats(-1, 2), SCALARS), restarts=st.one_of(st.integers(-2, 5), SCALARS),
       eot=st.one_of(st.integers(-2, 20), SCALARS), seed=st.one_of(st.integers(-5, 10**9), SCALARS),
       options=st.one_of(st.dictionaries(st.sampled_from(["version", "n_queries", "batch_size", "base", "x"]),
                                         VALUES, max_size=3), VALUES))
def test_any_threat_model_validates_or_raises_rqlab_error(attack, norm, eps, steps, step_size, restarts, eot, seed,
                                                          options):
    try:
        ThreatModel(attack, norm=norm, eps=eps, steps=steps, step_size=step_size, restarts=restarts, eot=eot,
                    seed=seed, options=options)
    except RqlabError:
        pass


RUN = st.fixed_dictionaries({"notebook": st.one_of(st.just("alpha"), SCALARS)},
                            optional={"name": VALUES, "params": VALUES, "grid": VALUES, "profiles": VALUES,
                                      "nottebook": VALUES})
CONFIG = st.fixed_dictionaries(
    {"runs": st.one_of(st.lists(RUN, max_size=3), VALUES)},
    optional={"notebooks_dir": st.one_of(st.just("nb"), VALUES), "default_profile": st.one_of(st.just("quick"), VALUES),
              "profiles": st.one_of(st.just({"quick": {"scale": 2.0}}), VALUES), "params": VALUES, "profile": VALUES})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=CONFIG, profile=st.one_of(st.none(), st.sampled_from(["quick", "full"])),
       only=st.one_of(st.none(), st.sampled_from(["alpha", "beta", "alpha,", ""])))
def test_any_report_config_validates_or_raises_rqlab_error(tmp_path_factory, config, profile, only):
    folder = tmp_path_factory.getbasetemp() / "property-config"
    if not (folder / "nb" / "alpha.ipynb").is_file():
        (folder / "nb").mkdir(parents=True, exist_ok=True)
        write_notebook(folder / "nb" / "alpha.ipynb")
    (folder / "c.yaml").write_text(yaml.safe_dump(config))
    try:
        report_config.plan(report_config.load_config(folder / "c.yaml"), profile, only)
    except RqlabError:
        pass
