"""What the benchmarks share: the machine line, interleaved timing with medians, the
benchmark models and batches, and a switch for rqlab's caches (to show what they save).

Timing rule (docs/performance.md): the contenders of one figure run in turn, once each
per repetition, in an order shuffled for each repetition (seeded: a fixed order lets the
machine's own rhythms favour one position), for `reps` repetitions after one untimed
warm-up round; every figure quoted is the median over the repetitions, and every ratio
is a ratio of those medians measured in the same run. Nothing here is a test: scripts
print, they do not assert.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rqlab import models, quant  # noqa: E402
from rqlab.machine import cpu_model  # noqa: E402,F401  (the CPU named beside every figure)

FMNIST = dict(input_shape=(1, 28, 28), mean=(0.286,), std=(0.353,))
CIFAR = dict(input_shape=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))


# ---- the machine ------------------------------------------------------------------------------

def machine(device: str = "cpu") -> dict:
    info = {"nproc": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device, "busy": busy_note()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def busy_note() -> str:
    """Other heavy processes on this machine (1-minute load average against the cores)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "unknown"
    return f"load average {load:.2f} on {os.cpu_count()} cores before the run"


def print_machine(info: dict) -> None:
    extra = f", GPU {info['gpu']}" if "gpu" in info else ""
    print(f"# {info['date_utc']} | nproc {info['nproc']} ({info['cpu']}), torch {info['torch']} "
          f"with {info['threads']} threads{extra} | {info['busy']}")
    print(f"# command: {' '.join([Path(sys.executable).name] + sys.argv)}")


# ---- timing -----------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(contenders: dict[str, Callable[[], object]], reps: int, device: str = "cpu",
                warmup: int = 1, progress: bool = True) -> dict[str, dict]:
    """Run each contender once per repetition, in a shuffled order (seeded); return
    {name: {"median", "times"}} in seconds."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
        _sync(device)
    times = {k: [] for k in contenders}
    order, rng = list(contenders), random.Random(0)
    for r in range(reps):
        rng.shuffle(order)
        for name in order:
            fn = contenders[name]
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        if progress:
            print(f"  rep {r + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()),
                  file=sys.stderr, flush=True)
    return {k: {"median": statistics.median(v), "times": v} for k, v in times.items()}


def spread(times: list[float]) -> str:
    """min..max of the repetitions, as a percentage around the median."""
    med = statistics.median(times)
    return f"{100 * (min(times) / med - 1):+.0f}%..{100 * (max(times) / med - 1):+.0f}%"


@contextlib.contextmanager
def caches_off():
    """rqlab without the frozen-weights cache (the path before issue 8), for comparison."""
    from rqlab.quant import layers

    real = layers.WEIGHT_CACHE
    layers.WEIGHT_CACHE = False
    try:
        yield
    finally:
        layers.WEIGHT_CACHE = real


# ---- models and batches -------------------------------------------------------------------------

def images(shape, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST test images for 1x28x28 when the data is there, else uniform noise
    (throughput does not depend on the pixel values); labels 0..9."""
    if tuple(shape) == (1, 28, 28):
        try:
            from rqlab import data

            ds = data.load("fashion-mnist", "test", n=n, seed=seed)
            return ds.x.float() / 255, ds.y.long()
        except Exception:  # noqa: BLE001 - no data: noise is as good for timing
            pass
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def build(name: str, bits=(4,), seed: int = 0, calib: torch.Tensor | None = None, **kw) -> torch.nn.Module:
    """A benchmark model ("smallcnn" at 1x28x28 or "preactresnet18" at 3x32x32), with
    activation ranges calibrated for `bits` on `calib` (random weights: throughput does
    not depend on them), in eval mode at FP."""
    torch.manual_seed(seed)
    norm = FMNIST if name == "smallcnn" else CIFAR
    m = models.create(name, **norm, **kw)
    if calib is None:
        calib = images(norm["input_shape"], 64, seed=1)[0]
    quant.calibrate(m, [calib[:64]], [b for b in bits if b < 32])
    return m.eval()


def shape_of(name: str) -> tuple[int, int, int]:
    return (FMNIST if name == "smallcnn" else CIFAR)["input_shape"]


# ---- command line and output ---------------------------------------------------------------------

def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (median quoted)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no per-repetition lines on stderr")
    return p


def setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def write_json(path: Path | None, payload: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1))
        print(f"# figures written to {path}")


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"
