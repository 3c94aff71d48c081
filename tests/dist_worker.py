"""What tests/test_distributed.py runs on every rank under torchrun (and once in-process,
as the single-process reference): `python -m torch.distributed.run --nproc-per-node 2
tests/dist_worker.py OUT`. Rank 0 writes OUT/*.pt and OUT/*.json.

Not a test module (pytest collects test_*.py only).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn

from rqlab import checkpoint, data, distributed, quant, zoo
from rqlab.attacks import ThreatModel
from rqlab.defenses import build
from rqlab.evaluation import evaluate
from rqlab.sanity import SanityConfig
from rqlab.training import TrainConfig, fit

N_TRAIN, BATCH, STEPS = 48, 16, 3   # 3 SGD steps of a global batch of 16 (8 per rank on 2 ranks)
N_EVAL, EVAL_BATCH = 12, 4          # 3 evaluation batches: ranks hold 2 and 1 (unequal shards)
AA_OPTIONS = {"n_iter": 1, "n_target_classes": 1, "n_queries": 2, "aa_batch_size": 4}  # a smoke budget


class TinyMLP(nn.Module):
    """No batch norm: N ranks then take exactly the SGD steps of one process."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):  # (B, 1, 28, 28) in [0, 1] -> (B, 10)
        return self.net(x)


def synthetic(n: int, seed: int = 0) -> data.Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    info = data.dataset_info("fashion-mnist")
    return data.Dataset("fashion-mnist", "train", x, y, info.mean, info.std, info.classes)


def tiny_model() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP()


def train_tiny(defense: str, group, attack_seed: int = 0) -> nn.Module:
    """STEPS SGD steps of TinyMLP on synthetic data, natural or PGD-AT (eps 0.1, 3 steps,
    random starts seeded with attack_seed)."""
    model = tiny_model()
    cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=0.05, schedule="constant", device="cpu")
    loader = data.Loader(synthetic(N_TRAIN), BATCH, shuffle=True, seed=0)
    if group is not None:
        loader = distributed.ShardedLoader(loader, group.rank, group.world)
    hooks = build(defense, seed=attack_seed, **({"steps": 3} if defense == "pgd-at" else {}))
    fit(model, loader, cfg, hooks=hooks, progress=False, log=None, group=group)
    return model


def evaluations(distributed_: bool) -> dict:
    """Records of the RPT zoo model under random precision over {4, 8} (PGD with 2 passes
    and the sanity checks on 4 examples, EOT-PGD, the expectation attack) and of the 4-bit one under the standard protocol
    (AutoAttack standard on a smoke budget, and PGD)."""
    test = data.load("fashion-mnist", "test", n=N_EVAL, seed=0)
    rpt, q4 = zoo.load("fmnist-rpt-pgd7-small"), zoo.load("fmnist-q4-pgd7-small")
    random = quant.RandomPrecision((4, 8), seed=0)
    kw = dict(batch_size=EVAL_BATCH, progress=False, distributed=distributed_)
    return {
        "pgd": evaluate(rpt, test, ThreatModel("pgd", eps=0.1, steps=2), policy=random, passes=2,
                        sanity=SanityConfig(n=4, square_queries=5), **kw),
        "eot_pgd": evaluate(rpt, test, ThreatModel("eot_pgd", eps=0.1, steps=2, eot=2), policy=random, **kw),
        "expectation": evaluate(rpt, test, ThreatModel("expectation", eps=0.1, steps=2), policy=random, **kw),
        "standard": evaluate(q4, test, ThreatModel("pgd", eps=0.1, steps=2), protocol="standard",
                             options=AA_OPTIONS, **kw),
    }


def main(out: Path) -> None:
    group = distributed.init("cpu")
    torch.set_num_threads(1)
    states = {d: train_tiny(d, group).state_dict() for d in ("natural", "pgd-at")}
    records = {k: r.to_dict() for k, r in evaluations(group is not None).items()}
    if distributed.is_main():
        checkpoint.save(out / "weights.pt", states)
        checkpoint.save_json(out / "records.json", records)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
