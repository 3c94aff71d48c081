"""Distributed training and sharded evaluation on 2 CPU processes (torchrun, gloo).

The references are independent of the distributed code: the same training and the same
evaluations in this one process. Each torchrun launch costs ~5 s of process start-up.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dist_worker
from rqlab import checkpoint, data, distributed, experiment, zoo
from rqlab.validate import RqlabError

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def _rqlab(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rqlab", *argv], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300, **kw)


def _comparable(record: dict) -> dict:
    """A record without what differs between any two runs (times) or says how it ran (ranks,
    and the threads each used, which device_name counts)."""
    r = json.loads(json.dumps(record))
    for key in ("wall_time_s", "world_size", "device_name"):
        r["extra"].pop(key, None)
    for a in r.get("attacks") or ():
        a.pop("time_s", None)
        for s in a.get("stages", ()):
            s.pop("time_s", None)
    return r


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """tests/dist_worker.py on 2 ranks: {"weights": {...}, "records": {...}}."""
    try:
        data.load("fashion-mnist", "test", n=1)
        zoo.load("fmnist-rpt-pgd7-small"), zoo.load("fmnist-q4-pgd7-small")
    except RqlabError as e:
        pytest.skip(f"needs Fashion-MNIST and the zoo: {e}")
    out = tmp_path_factory.mktemp("two_ranks")
    run = subprocess.run([*TORCHRUN, str(ROOT / "tests" / "dist_worker.py"), str(out)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {"weights": checkpoint.load(out / "weights.pt"), "records": json.loads((out / "records.json").read_text())}


def test_two_ranks_natural_training_equals_one_process_with_the_global_batch(two_ranks):
    one = dist_worker.train_tiny("natural", None).state_dict()
    two = two_ranks["weights"]["natural"]
    start = dist_worker.tiny_model().state_dict()
    for k in one:
        assert not torch.equal(one[k], start[k])  # it trained
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)


def test_two_ranks_pgd_at_agrees_with_one_process_within_the_random_start_noise(two_ranks):
    # Each rank draws the PGD random starts of its own half of the batch from the step's
    # seed, so they are not the single process's: the 2-rank weights must be as close to
    # the 1-process ones as a 1-process run with other random starts is (and no farther).
    one = dist_worker.train_tiny("pgd-at", None).state_dict()
    two = two_ranks["weights"]["pgd-at"]
    other = dist_worker.train_tiny("pgd-at", None, attack_seed=1000).state_dict()
    natural = dist_worker.train_tiny("natural", None).state_dict()
    for k in one:
        noise = (other[k] - one[k]).abs().max().item()
        assert 0 < noise < 0.5 * (natural[k] - one[k]).abs().max().item()  # PGD-AT differs from natural
        assert (two[k] - one[k]).abs().max().item() <= 2 * noise


@pytest.mark.parametrize("name", ["pgd", "eot_pgd", "expectation", "standard"])
def test_sharded_evaluation_record_equals_the_single_process_one(two_ranks, name):
    one = _single_records()[name]
    two = two_ranks["records"][name]
    assert two["extra"]["world_size"] == 2 and "world_size" not in one["extra"]
    assert two["n"] == dist_worker.N_EVAL == len(two["per_example"]["robust"])
    assert _comparable(two) == _comparable(one)
    if name == "pgd":  # the sanity checks ran on rank 0 and every rank returned them
        assert len(two["sanity"]) >= 3
    if name == "standard":  # AutoAttack (its 4 attacks) and PGD, each per example
        assert [a["name"] for a in two["attacks"]] == ["autoattack", "pgd"]
        assert [s["attack"] for s in two["attacks"][0]["stages"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]


_SINGLE = {}


def _single_records() -> dict:
    if not _SINGLE:
        _SINGLE.update({k: r.to_dict() for k, r in dist_worker.evaluations(False).items()})
    return _SINGLE


def test_sharded_evaluation_outside_torchrun_is_the_single_process_one():
    assert distributed.current() is None and not distributed.under_torchrun()
    assert list(distributed.batch_indices(5, None)) == [0, 1, 2, 3, 4]


def test_sharded_loader_splits_every_global_batch_without_overlap():
    ds = dist_worker.synthetic(20)
    loader = data.Loader(ds, 8, shuffle=True, seed=3)
    parts = [distributed.ShardedLoader(loader, r, 3) for r in range(3)]
    for whole, *shards in zip(loader, *parts):
        assert torch.equal(torch.cat([y for _, y in shards]), whole[1])
        assert max(len(y) for _, y in shards) - min(len(y) for _, y in shards) <= 1
    weights = [p.loss_weight(len(y)) for p, (_, y) in zip(parts, [next(iter(p)) for p in parts])]
    assert sum(weights) == pytest.approx(3.0)
    with pytest.raises(RqlabError, match="batch_size=8 over 17 examples leaves a batch of 1 examples for 3 ranks"):
        distributed.ShardedLoader(data.Loader(dist_worker.synthetic(17), 8), 0, 3)


def test_strip_nproc():
    assert distributed.strip_nproc(["train", "--nproc", "2", "--epochs", "1", "--nproc=3"]) == \
        ["train", "--epochs", "1"]


# ---- a rank that dies, and resuming on 1 or 2 ranks ----------------------------------------

# RPT with PGD-7 over {4, 8}: switchable BN (DDP's unused parameters) and a precision per step
TRAIN = ["train", "--n-train", "512", "--eval-n", "64", "--batch-size", "32", "--defense", "rpt-pgd-at",
         "--bits", "4,8", "--epochs", "3", "--device", "cpu", "--no-progress"]


def _children(pid: int) -> list[int]:
    try:
        kids = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def _rank_pid(root: int, rank: int) -> int | None:
    for pid in _children(root):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"rqlab" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    return None


def test_killed_rank_stops_the_run_and_it_resumes_on_one_or_two_ranks(tmp_path):
    try:
        data.load("fashion-mnist", "train", n=1)
    except RqlabError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "rqlab", *TRAIN, "--out", str(out), "--nproc", "2"], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = out / "checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)  # mid-epoch 2 (epoch 1's checkpoint was just written)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stdout[-2000:] + stderr[-2000:]
    assert "rqlab: error: a rank of the 2 processes failed" in stderr
    assert "resume from the last checkpoint" in stderr
    done = checkpoint.load(ckpt)["epoch"]
    assert 1 <= done < 3
    first = json.loads((out / "history.json").read_text())

    two = tmp_path / "run2"
    shutil.copytree(out, two)
    # resume on 1 process (in this one)
    spec = experiment.RunSpec.from_dict(json.loads((out / "spec.json").read_text()))
    logs = []
    _, history = experiment.train(spec, out, progress=False, log=logs.append)
    assert logs[0].startswith(f"resuming {ckpt} after epoch {done}/3")
    assert [r["epoch"] for r in history] == [1, 2, 3] and history[:done] == first
    # resume on 2 ranks (the same command)
    run = _rqlab(*TRAIN, "--out", str(two), "--nproc", "2")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert f"resuming {two / 'checkpoint.pt'} after epoch {done}/3" in run.stdout
    history2 = json.loads((two / "history.json").read_text())
    assert [r["epoch"] for r in history2] == [1, 2, 3] and history2[:done] == first
    assert history2[-1]["clean_accuracy"] > 0.3  # it kept learning (10 classes)
    assert sum(history2[-1]["rpt_bits_drawn"].values()) == 512 // 32  # every step drew one precision


def test_eval_nproc_writes_the_single_process_record(tmp_path):
    try:
        zoo.load("fmnist-q4-pgd7-small")
    except RqlabError as e:
        pytest.skip(f"needs the zoo: {e}")
    # the quick protocol: the standard one under 2 ranks is test_sharded_evaluation_...[standard]'s
    argv = ["eval", "--model", "fmnist-q4-pgd7-small", "--n", "24", "--batch-size", "8", "--steps", "3",
            "--protocol", "quick", "--device", "cpu", "--no-progress"]
    two = _rqlab(*argv, "--nproc", "2", "--json", str(tmp_path / "two.json"))
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert two.stdout.count("robust") == 1  # one rank printed the table
    from rqlab.cli import main

    assert main([*argv, "--json", str(tmp_path / "one.json")]) == 0
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    assert two["extra"]["world_size"] == 2
    assert _comparable(two) == _comparable(one)


def test_nproc_under_torchrun_is_an_error(monkeypatch):
    from rqlab.cli import main

    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train", "--nproc", "2", "--epochs", "1"]) == 2


# ---- the CIFAR-10 path, on synthetic 32x32 data -------------------------------------------

def _synthetic_cifar(split: str, n: int) -> data.Dataset:
    g = torch.Generator().manual_seed(1)
    info = data.dataset_info("cifar10")
    return data.Dataset("cifar10", split, torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                        torch.randint(0, 10, (n,), generator=g), info.mean, info.std, info.classes)


@pytest.mark.parametrize("name", ["cifar10-preactresnet18-q4-pgd7", "cifar10-wrn34-10-pgd7"])
def test_cifar10_recipe_trains_one_step_end_to_end(tmp_path, name):
    """The recipe's spec (model, precision, PGD-7 at 8/255 with step 2/255, augmentation),
    cut to one SGD step of 2 synthetic images with a 1-step attack, through rqlab.train."""
    spec = zoo.recipe(name).spec
    assert spec.data == "cifar10" and spec.eps == pytest.approx(8 / 255)
    spec = spec.replace(train={"epochs": 1, "batch_size": 2, "n_train": 2, "eval_n": 2, "device": "cpu"},
                        defense_config={**spec.defense_config, "steps": 1}, eval_pgd=2)
    start = experiment.build_model(spec).state_dict()
    model, history = experiment.train(spec, tmp_path, train_set=_synthetic_cifar("train", 2),
                                      test_set=_synthetic_cifar("test", 2), progress=False, log=None)
    assert len(history) == 1 and 0 <= history[0]["robust_accuracy"] <= history[0]["clean_accuracy"] <= 1
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert any("conv" in k for k in moved)  # the SGD step changed the weights
    assert experiment.restore(tmp_path / "checkpoint.pt").config.name == spec.model


def test_gpu_recipes_list_their_multi_gpu_command():
    table = zoo.table()
    for r in zoo.RECIPES.values():
        if r.gpu:
            assert f"{r.command} --nproc {zoo.GPUS}" in table
    assert {"preactresnet18", "wrn34-10"} == {r.spec.model for r in zoo.RECIPES.values() if r.gpu}
    defenses = {r.spec.defense for r in zoo.RECIPES.values() if r.gpu}
    assert {"pgd-at", "rpt-pgd-at", "dq-pgd-at", "odgq"} <= defenses
