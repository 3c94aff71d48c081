"""Several processes on PyTorch's own distributed engine: `torch.distributed`, launched by
`torchrun` (one process per GPU, or per CPU share with gloo).

    torchrun --standalone --nproc-per-node 4 -m rqlab train --model preactresnet18 --data cifar10 ...
    rqlab train --nproc 4 ...            # the same: rqlab launches torchrun for you
    rqlab eval --nproc 4 --model runs/x --protocol standard ...

What this module holds (the loop itself stays `training.fit`, the evaluation `evaluate`):

* `init()`: join the process group torchrun describes in the environment (RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL on CUDA, gloo on CPU. Outside torchrun
  (or with a world of one) it returns None and everything runs as one process.
* `Group`: who we are (rank, world, device) and the few collectives rqlab needs.
* `ShardedLoader`: rank r's contiguous part of every global batch of a loader. The global
  batch (TrainConfig.batch_size) and the order (seed + epoch) do not depend on the number
  of ranks, so a run resumes on any number of ranks and N ranks take the same SGD steps
  as one process with the same batch (up to float summation order and batch norm, whose
  statistics are per rank).
* `batch_indices(n_batches, group)`: the evaluation's batches of one rank (round robin,
  whole batches, so batch i keeps its attack seed threat.seed + i on any rank).
* `launch(argv, nproc)`: run `python -m torch.distributed.run --standalone
  --nproc-per-node N -m rqlab -- ARGV` and turn a failed rank into a clear RqlabError.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .validate import RqlabError, check_int

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# How long a collective waits for a silent peer before it fails (torchrun stops the
# others anyway as soon as one rank exits; this bounds a rank that hangs without exiting).
TIMEOUT_S = int(os.environ.get("RQLAB_DIST_TIMEOUT", "1800"))


def under_torchrun() -> bool:
    """True when torchrun (or another env:// launcher) started this process with a world > 1."""
    return all(k in os.environ for k in ENV) and int(os.environ["WORLD_SIZE"]) > 1


@dataclass(frozen=True)
class Group:
    """This process's place in the process group: rank in 0..world-1, and its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, logs and records."""
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over the ranks (a new tensor on t's device; NCCL reduces on the GPU)."""
        out = t.detach().to(self.device if self.backend == "nccl" else t.device).clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable values)."""
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        """Rank src's `obj`, on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` in DistributedDataParallel: gradients averaged over the ranks in backward.

        Switchable batch norm leaves the other precisions' branches unused in a step, so
        DDP then looks for unused parameters (find_unused_parameters)."""
        from torch.nn.parallel import DistributedDataParallel

        sbn = getattr(getattr(model, "config", None), "sbn_bits", None)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=bool(sbn))


def current() -> Group | None:
    """The Group of an initialised process group, else None (one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    backend = dist.get_backend()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Group(dist.get_rank(), dist.get_world_size(), local, device, backend)


def init(device: str | torch.device = "auto") -> Group | None:
    """Join torchrun's process group (once per process); None outside torchrun.

    device: "auto" / "cuda" -> NCCL with GPU LOCAL_RANK when CUDA is available; "cpu"
    (or no GPU with "auto") -> gloo on the CPU. Raises RqlabError when there are more
    local ranks than GPUs.
    """
    group = current()
    if group is not None or not under_torchrun():
        return group
    local = int(os.environ["LOCAL_RANK"])
    kind = torch.device(device).type if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if local >= torch.cuda.device_count():
            raise RqlabError(f"local rank {local} has no GPU: this node has {torch.cuda.device_count()}; "
                             "give --nproc-per-node at most the number of GPUs")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=timedelta(seconds=TIMEOUT_S))
    return current()


def is_main() -> bool:
    """True in rank 0 and in a single process."""
    group = current()
    return group.is_main if group is not None else os.environ.get("RANK", "0") == "0"


# ---- data: a rank's share ---------------------------------------------------------------

class ShardedLoader:
    """Rank `rank`'s part of every batch of `loader` (a `data.Loader` or any re-iterable
    of (x (B, ...), y (B,)) with batch_size and set_epoch).

    Batch b of size n is split into `world` contiguous parts of sizes differing by at
    most one (`torch.tensor_split`); `global_n` is n, for the loss weight of
    `loss_weight`. The global batch, the order and the augmentation are those of
    `loader`, whatever the number of ranks.
    """

    def __init__(self, loader, rank: int, world: int):
        self.loader, self.rank, self.world = loader, check_int(rank, "rank", 0, world - 1), world
        n, b = len(loader.dataset), loader.batch_size
        last = n % b or b
        if min(b, last) < world:
            raise RqlabError(f"batch_size={b} over {n} examples leaves a batch of {min(b, last)} examples for "
                             f"{world} ranks: every rank needs at least one example of every batch; use a "
                             "batch_size (and training-set size) of at least the number of ranks")
        self.batch_size = b
        self.global_n = b

    @property
    def dataset(self):
        return self.loader.dataset

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            self.global_n = len(y)
            idx = torch.tensor_split(torch.arange(len(y)), self.world)[self.rank]
            yield x[idx], y[idx]

    def loss_weight(self, n_local: int) -> float:
        """world * n_local / global_n: DDP averages the ranks' gradients, so a rank's mean
        loss weighted so makes the average the gradient of the global batch's mean loss
        (1.0 when the parts are equal)."""
        return self.world * n_local / self.global_n


# ---- evaluation: whole batches per rank ----------------------------------------------------

def batch_indices(n_batches: int, group: Group | None) -> range:
    """The evaluation batches rank `group.rank` runs: i = rank, rank + world, ... (all of
    them without a group). Whole batches: batch i's attack seed and draws stay i's."""
    return range(n_batches) if group is None else range(group.rank, n_batches, group.world)


# ---- launching ---------------------------------------------------------------------------

def launch(argv: list[str], nproc: int, extra: list[str] | None = None) -> int:
    """Run `torchrun --standalone --nproc-per-node nproc -m rqlab -- ARGV` (one node) and wait.

    extra: more torchrun arguments (before -m). Returns 0; a failed rank raises RqlabError
    (torchrun stops the other ranks as soon as one exits with an error, and prints which
    rank failed and why above this message).
    """
    nproc = check_int(nproc, "nproc", 1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *(extra or []), "-m", "rqlab", "--", *argv]  # "--": torchrun leaves ARGV alone
    print("rqlab: torchrun " + " ".join(cmd[3:]), flush=True)  # torchrun = python -m torch.distributed.run
    code = subprocess.run(cmd).returncode
    if code != 0:
        raise RqlabError(f"a rank of the {nproc} processes failed (torchrun exit code {code}); torchrun stopped "
                         "the others: its error is printed above. Run the same command again to resume from "
                         "the last checkpoint (on any number of processes)")
    return 0


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N` (what the launched processes get)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


__all__ = ["Group", "ShardedLoader", "init", "current", "is_main", "under_torchrun", "batch_indices", "launch",
           "strip_nproc"]
