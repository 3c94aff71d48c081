"""Training: one loop that natural training and every defense plug into.

    >>> cfg = TrainConfig(epochs=2, batch_size=128, lr=0.1)
    >>> history = fit(model, train_loader, cfg, out="runs/x", test_loader=test_loader)
    >>> accuracy(model, test_loader, policy=quant.Fixed(4))

`fit` runs SGD (momentum 0.9, weight decay 5e-4, METHODS section 2) under a learning-rate
schedule, evaluates clean test accuracy after every epoch, and (with `out`) writes an
atomic checkpoint plus history.json after every epoch; the previous epoch's checkpoint is
kept beside it (checkpoint.prev.pt), and resuming falls back to it, with a warning, when
checkpoint.pt is unreadable. An interrupted run resumes from its last checkpoint and ends
with exactly the weights of an uninterrupted run (CPU).

Defenses change the loop through `Hooks` (precision per step, the training batch, the
loss), never by copying it. The precision the model trains at is the policy applied to
it beforehand (`quant.apply(model, policy)`); a RandomPrecision policy draws a new
precision every forward.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint, quant
from .validate import RqlabError, check_choice, check_float, check_int

SCHEDULES = ("step", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
# Fields that may differ between a checkpoint and the run resuming it: they change
# neither the weights' trajectory nor its record (epochs may grow to extend a run).
RESUME_FREE_FIELDS = ("epochs", "device", "eval_n", "log_every", "channels_last", "compile")


# ---- configuration ------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (stored in its checkpoint).

    epochs: passes over the training set (>= 1).
    batch_size: examples per SGD step; the loader must use the same.
    lr: base learning rate (METHODS: 0.1); momentum, weight_decay: SGD settings.
    schedule: "step" (x0.1 at 50% and 75% of training, METHODS section 2), "cosine"
        (to 0) or "constant"; evaluated per step from the fraction of training done.
    seed: seeds torch and python RNGs; the loader's order comes from its own seed + epoch.
    device: "auto" (cuda if available), "cpu" or "cuda".
    amp: bf16 autocast for the training step (CUDA only; ignored on CPU).
    channels_last: NHWC memory format for the model and its batches, on any device (on a CPU,
        oneDNN's convolutions are faster in it: a PGD-7 batch of SmallCNN costs 0.6-0.8x,
        `benchmarks/training_cost.py --formats`); the arithmetic differs only by float rounding.
    compile: `torch.compile` the model for the training forward/backward (CUDA only).
    augment: data augmentation in the training loader (recorded; the loader applies it).
    n_train: training subset size (None: all), used by whoever builds the loader.
    eval_n: test examples for the per-epoch clean accuracy (None: the whole loader).
    log_every: steps between progress-bar updates (each update syncs the device).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    augment: bool = False
    n_train: int | None = None
    eval_n: int | None = None
    log_every: int = 20

    def __post_init__(self):
        check_int(self.epochs, "epochs", 1)
        check_int(self.batch_size, "batch_size", 1)
        check_float(self.lr, "lr", 0.0, lo_open=True)
        check_float(self.momentum, "momentum", 0.0, 1.0)
        check_float(self.weight_decay, "weight_decay", 0.0)
        check_choice(self.schedule, "schedule", SCHEDULES)
        check_int(self.seed, "seed", 0)
        check_choice(self.device, "device", DEVICES)
        for key in ("amp", "channels_last", "compile", "augment"):
            if not isinstance(getattr(self, key), bool):
                raise RqlabError(f"{key}={getattr(self, key)!r} must be True or False")
        if self.n_train is not None:
            check_int(self.n_train, "n_train", 1)
        if self.eval_n is not None:
            check_int(self.eval_n, "eval_n", 1)
        check_int(self.log_every, "log_every", 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RqlabError(f"train config has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d)


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate of SGD step `step` (0-based) out of `total_steps`."""
    t = step / max(total_steps, 1)  # fraction of training done, in [0, 1)
    if cfg.schedule == "step":
        return cfg.lr * (0.1 if t >= 0.5 else 1.0) * (0.1 if t >= 0.75 else 1.0)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    return cfg.lr


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available else cpu; "cuda" without a GPU raises."""
    check_choice(name, "device", DEVICES)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RqlabError("device='cuda' was asked for but no CUDA GPU is available: use --device cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and python's `random`. Call before building a model."""
    torch.manual_seed(seed)
    random.seed(seed)


# ---- hooks: how a defense changes the loop --------------------------------------------

class Hooks:
    """Natural training. A defense subclasses this and overrides what it changes.

    Per step, `fit` calls: precision(model, step) -> batch(model, x, y) -> loss(model, x, y)
    -> backward -> SGD step. Per epoch: epoch_end(model, epoch, metrics), which may add
    keys to `metrics` (the history row). A hook's own randomness belongs in
    state_dict()/load_state_dict() so that resumed runs stay exact; its settings (eps,
    beta, ...) in config(), which is stored in checkpoints and must match on resume.
    """

    name = "natural"

    def config(self) -> dict:
        """The settings that define this defense (JSON-like values), e.g. {"eps": 0.1}."""
        return {}

    def precision(self, model: nn.Module, step: int) -> None:
        """Set the model's precision before step `step` (default: keep the applied policy)."""

    def batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """Turn the clean batch into the training batch, e.g. craft adversarial x.

        x: (B, C, H, W) in [0, 1]; y: (B,) int64. Returns (x, y) of the same kinds.
        Leave the model in train mode.
        """
        return x, y

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """(scalar loss, logits (B, classes)) of the training batch."""
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def epoch_end(self, model: nn.Module, epoch: int, metrics: dict) -> None:
        """After epoch `epoch` (0-based) was trained and evaluated; may add to `metrics`."""


# ---- evaluation ----------------------------------------------------------------------

@torch.no_grad()
def accuracy(model: nn.Module, loader, policy=None, n: int | None = None) -> float:
    """Clean accuracy in [0, 1] over `loader` (at most the first `n` examples).

    Runs in eval mode (restored after) under `policy` if given (restored after), else
    under the model's current policy, with the weights quantized once
    (`quant.frozen_weights`). no_grad, not inference_mode: tensors made here may later
    meet autograd.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    try:
        with quant.using(model, policy) if policy is not None else contextlib.nullcontext(), \
                quant.frozen_weights(model):
            for x, y in loader:
                if n is not None:
                    x, y = x[: n - total], y[: n - total]
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                correct += (model(x).argmax(dim=1) == y).sum()  # (B, classes) -> count
                total += len(y)
                if n is not None and total >= n:
                    break
    finally:
        model.train(was_training)
    if total == 0:
        raise RqlabError("accuracy got no examples: the loader is empty")
    return correct.item() / total


# ---- the loop -------------------------------------------------------------------------

def fit(model: nn.Module, train_loader, cfg: TrainConfig, hooks: Hooks | None = None, out=None,
        test_loader=None, resume: bool = True, progress: bool = True,
        log: Callable[[str], None] | None = print, epoch_metrics: dict | None = None,
        meta: dict | None = None, group=None) -> list[dict]:
    """Train `model` in place; return the history (one metrics dict per epoch).

    train_loader: yields (x (B, C, H, W) float in [0, 1], y (B,) int64); `set_epoch(e)`
        is called before epoch e if it exists (the data order of epoch e).
    out: directory for checkpoint.pt and history.json, written after every epoch.
    resume: continue from out/checkpoint.pt when it exists (configs must match, except
        the fields in RESUME_FREE_FIELDS; `epochs` may grow, and the schedule is then
        that of the new total). resume=False starts over and overwrites it.
    log: where epoch summaries go (None: silent); progress: a tqdm bar per epoch.
    epoch_metrics: {key: fn(model) -> float}, called after each epoch (not timed) under
        the evaluation policy, e.g. {"robust_accuracy": ...}; each value goes into the history row.
    meta: JSON-like values stored with every checkpoint (e.g. {"spec": RunSpec.to_dict()}).
    group: a `distributed.Group` to train on several processes (torchrun): train_loader
        is then the rank's `distributed.ShardedLoader`, the loss's forward/backward runs
        in DistributedDataParallel (the defense crafts its batch on the plain model, on
        the rank's own examples), the history row sums all ranks, and only rank 0
        writes checkpoints and history.json.

    History rows: epoch, train_loss, train_acc, clean_accuracy (on test_loader, or None),
    lr, epoch_time_s, cumulative_time_s, and the epoch_metrics' keys.
    """
    from tqdm.auto import tqdm

    if not isinstance(cfg, TrainConfig):
        raise RqlabError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    hooks = hooks if hooks is not None else Hooks()
    log = log or (lambda msg: None)
    device = resolve_device(cfg.device)
    use_amp = cfg.amp and device.type == "cuda"
    if cfg.amp and not use_amp:
        log("note: amp (bf16 autocast) is CUDA only; training in fp32 on cpu")
    if cfg.compile and device.type != "cuda":
        log("note: compile is a CUDA option; ignored on cpu")
    memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
    loader_bs = getattr(train_loader, "batch_size", None)
    if loader_bs is not None and loader_bs != cfg.batch_size:
        raise RqlabError(f"the training loader has batch_size={loader_bs} but cfg.batch_size={cfg.batch_size}: "
                         "build the loader from the config")
    steps = len(train_loader)  # SGD steps per epoch
    if steps == 0:
        raise RqlabError("the training loader is empty: give at least one batch")
    total_steps = cfg.epochs * steps

    model.to(device, memory_format=memory_format)
    net = group.wrap(model) if group is not None else model  # what the loss's forward/backward runs
    if cfg.compile and device.type == "cuda":
        net = torch.compile(net)
    policy = quant.current(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    seed_everything(cfg.seed)

    ckpt_path = Path(out) / "checkpoint.pt" if out is not None else None
    start_epoch, history = 0, []
    if resume and ckpt_path is not None and (ckpt_path.exists() or previous_checkpoint(ckpt_path).exists()):
        used, ckpt = _load_newest(ckpt_path, log)
        start_epoch, history = _resume(used, ckpt, model, optimizer, cfg, hooks, policy, steps)
        log(f"resuming {used} after epoch {start_epoch}/{cfg.epochs}")

    for epoch in range(start_epoch, cfg.epochs):
        # -- train one epoch --
        model.train()
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        bar = tqdm(train_loader, total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):  # the bar closes itself when the loop ends
            step = epoch * steps + i
            lr = lr_at(cfg, step, total_steps)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            x = x.to(device, non_blocking=True, memory_format=memory_format)  # (B, C, H, W)
            y = y.to(device, non_blocking=True)                                 # (B,)
            n_local = len(y)
            hooks.precision(model, step)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                x, y = hooks.batch(model, x, y)
                loss, logits = hooks.loss(net, x, y)  # scalar, (B, classes)
            optimizer.zero_grad(set_to_none=True)  # after batch(): an attack may have left grads
            (loss * train_loader.loss_weight(n_local) if group is not None else loss).backward()
            optimizer.step()

            loss_sum += loss.detach().float() * len(y)
            correct += (logits.detach().argmax(dim=1) == y).sum()
            seen += len(y)
            if (i + 1) % cfg.log_every == 0 or i + 1 == steps:
                mean_loss = loss_sum.item() / seen
                _check_finite(mean_loss, epoch, cfg)
                if progress:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{correct.item() / seen:.3f}", lr=f"{lr:.4g}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_time = time.perf_counter() - t0  # training only: evaluation and saving excluded
        if group is not None:  # the history row is the global batch's, summed over the ranks
            totals = group.all_sum(torch.stack([loss_sum.double(), correct.double(),
                                                torch.tensor(float(seen), device=device, dtype=torch.float64)]))
            loss_sum, correct, seen = totals[0], totals[1], int(totals[2].item())

        # -- evaluate, record, save --
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum.item() / seen,
            "train_acc": correct.item() / seen,
            "clean_accuracy": _evaluate(model, test_loader, policy, cfg) if test_loader is not None else None,
            "lr": lr,
            "epoch_time_s": epoch_time,
            "cumulative_time_s": (history[-1]["cumulative_time_s"] if history else 0.0) + epoch_time,
        }
        for key, metric in (epoch_metrics or {}).items():
            with quant.using(model, quant.policy_from_dict(policy.to_dict())):
                row[key] = float(metric(model))
        _check_finite(row["train_loss"], epoch, cfg)
        hooks.epoch_end(model, epoch, row)
        history.append(row)
        if ckpt_path is not None and (group is None or group.is_main):
            _save(ckpt_path, model, optimizer, cfg, hooks, policy, history, steps, meta)
        test = f"  clean_accuracy {row['clean_accuracy']:.4f}" if row["clean_accuracy"] is not None else ""
        test += "".join(f"  {k} {row[k]:.4f}" for k in (epoch_metrics or {}))
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  train_acc {row['train_acc']:.4f}"
            f"{test}  lr {lr:.4g}  {epoch_time:.1f}s")
    return history


def _evaluate(model, loader, policy, cfg: TrainConfig) -> float:
    # A fresh copy of the policy: a random one then draws the same precisions at every
    # evaluation, and leaves the training policy's generator (saved for resuming) alone.
    return accuracy(model, loader, quant.policy_from_dict(policy.to_dict()), cfg.eval_n)


def _check_finite(loss: float, epoch: int, cfg: TrainConfig) -> None:
    if not math.isfinite(loss):
        raise RqlabError(f"training loss became {loss} in epoch {epoch + 1} (lr={cfg.lr}): lower lr; "
                         "the last checkpoint (if any) is the previous epoch's")


# ---- checkpoints of a run ---------------------------------------------------------------

def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


def _model_config(model: nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    return config.to_dict() if config is not None else None


def previous_checkpoint(path) -> Path:
    """Where the last good checkpoint is kept beside the newest: checkpoint.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _keep_previous(path: Path) -> None:
    """Make checkpoint.prev.pt the current checkpoint.pt before the newest replaces it: a
    hard link (no copy, and checkpoint.pt exists at every moment), else an atomic copy."""
    if not path.is_file():
        return
    prev = previous_checkpoint(path)
    link = path.with_name(f"{checkpoint.temp_prefix(prev.name)}link.tmp")
    try:
        os.link(path, link)
        os.replace(link, prev)
    except OSError:  # no hard links here
        if link.exists():
            link.unlink()
        with open(path, "rb") as src:
            checkpoint.atomic_write(prev, lambda f: shutil.copyfileobj(src, f))


def _load_newest(path: Path, log) -> tuple[Path, dict]:
    """The newest readable checkpoint: checkpoint.pt, else (truncated, corrupt or missing)
    checkpoint.prev.pt with a warning. Returns (the file used, its payload)."""
    prev = previous_checkpoint(path)
    try:
        return path, checkpoint.load(path)
    except RqlabError as e:
        if not prev.is_file():
            raise
        log(f"warning: {path} is not usable ({str(e).splitlines()[0][:200]}); resuming from the last good "
            f"checkpoint {prev} instead (the epochs after it are trained again)")
        return prev, checkpoint.load(prev)


def _save(path: Path, model, optimizer, cfg, hooks, policy, history, steps, meta=None) -> None:
    epoch = history[-1]["epoch"]
    _keep_previous(path)
    checkpoint.save(path, {
        "model": _model_config(model),
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        # the lr is a pure function of the step (lr_at), so the step is the scheduler's state
        "schedule": {"kind": cfg.schedule, "step": epoch * steps, "steps_per_epoch": steps},
        "rng": _rng_state(),
        "train_config": cfg.to_dict(),
        "hooks": {"name": hooks.name, "config": hooks.config(), "state": hooks.state_dict()},
        "epoch": epoch,
        "history": history,
        "policy": policy.to_dict(),
        "policy_state": checkpoint.policy_state(policy),
        **({"meta": meta} if meta else {}),
    })
    checkpoint.save_json(path.parent / "history.json", history)


def _diff(label: str, old: dict | None, new: dict | None, free=()) -> list[str]:
    old, new = old or {}, new or {}
    return [f"{label}.{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
            for k in sorted(set(old) | set(new)) if k not in free and old.get(k) != new.get(k)]


def _resume(path: Path, ckpt: dict, model, optimizer, cfg, hooks, policy, steps) -> tuple[int, list[dict]]:
    """Load a run's checkpoint (read from `path`) into model/optimizer/hooks/RNGs; return
    (epochs done, history)."""
    diffs = (_diff("train_config", ckpt.get("train_config"), cfg.to_dict(), RESUME_FREE_FIELDS)
             + _diff("model", ckpt.get("model"), _model_config(model))
             + _diff("policy", ckpt.get("policy"), policy.to_dict())
             + _diff("hooks", {"name": ckpt.get("hooks", {}).get("name"), **ckpt.get("hooks", {}).get("config", {})},
                     {"name": hooks.name, **hooks.config()}))
    if ckpt.get("schedule", {}).get("steps_per_epoch") not in (None, steps):
        diffs.append(f"steps per epoch: {ckpt['schedule']['steps_per_epoch']} in the checkpoint, {steps} now "
                     "(a different training set or loader)")
    if diffs:
        raise RqlabError(f"cannot resume {path}: it was written by a different run:\n  " + "\n  ".join(diffs)
                         + "\nuse the same settings, another output directory, or resume=False "
                           "(--no-resume) to start over and overwrite it")
    done = int(ckpt["epoch"])
    if done > cfg.epochs:
        raise RqlabError(f"cannot resume {path}: it has {done} epochs done but epochs={cfg.epochs}; "
                         f"ask for epochs >= {done}")
    model.load_state_dict(ckpt["state_dict"], strict=True)
    optimizer.load_state_dict(ckpt["optimizer"])
    hooks.load_state_dict(ckpt["hooks"]["state"])
    if ckpt.get("policy_state") is not None and hasattr(policy, "set_state"):
        policy.set_state(ckpt["policy_state"])
    _set_rng_state(ckpt["rng"])
    return done, list(ckpt["history"])


__all__ = ["TrainConfig", "Hooks", "fit", "accuracy", "lr_at", "resolve_device", "seed_everything",
           "SCHEDULES", "RESUME_FREE_FIELDS"]
