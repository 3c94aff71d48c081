"""The machine a figure was measured on, named beside it (CPU models vary between machines)."""
from __future__ import annotations

import platform
import re
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC ...", "Intel(R) Xeon(R) ..."), from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device) -> str:
    """'cpu (AMD EPYC 9R14, 2 threads)' or 'cuda (NVIDIA H200)': the device with its model."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"{device.type} ({cpu_model()}, {n} thread{'' if n == 1 else 's'})"


def devices_line(names) -> str:
    """Distinct device names, sorted and comma-separated, for a "Measured on ..." line;
    records written before device_name said "1 thread" read "1 threads" and are counted
    with the new spelling."""
    return ", ".join(sorted({re.sub(r"\b1 threads\b", "1 thread", str(n)) for n in names if n}))
