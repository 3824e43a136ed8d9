"""The one place a device name becomes a torch.device: sample.py, mars.eval, the app and training use it.

    from mars.device import resolve_device
    device = resolve_device(None)      # cuda when available, else cpu
    device = resolve_device("cuda:1", "--device")  # or a one-line ValueError saying what to use instead
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def resolve_device(name: str | None, what: str = "device"):
    """A torch.device that exists on this machine (None: cuda when available, else cpu), or a ValueError
    that calls the setting `what` (the flag or variable the name came from)."""
    import torch

    if name is None or not name.strip():
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name.strip())
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{what} {name!r} is not a device: use cpu, cuda, cuda:N or mps")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[device.type]:
        raise ValueError(f"{what} {name}: no {device.type.upper()} device on this machine; use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{what} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def cpu_name() -> str:
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_hardware(device=None) -> str:
    """What a run ran on, for the records a run leaves ("1x NVIDIA H100 80GB HBM3", "2 cores of Intel(R)
    Xeon(R) Processor, AVX512"): the GPU when `device` (default: resolve_device(None)) is one, else the CPU."""
    import torch

    device = resolve_device(None) if device is None else torch.device(device)
    if device.type == "cuda":
        return f"1x {torch.cuda.get_device_name(device)}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores of {cpu_name()}, {torch.backends.cpu.get_cpu_capability()}"
