"""Device-correct wall-clock reads: the one place this project times a phase.

On a GPU, kernels run asynchronously: reading the clock right after a forward call measures the
launch, not the work. `Clock(device).now()` first waits for the device's queued work, so a difference
of two reads is the time the phase took. On the CPU it is `time.perf_counter()`.

Example:
    >>> clock = Clock("cpu")
    >>> t0 = clock.now(); _ = sum(range(1000)); elapsed_ms = clock.ms_since(t0)
"""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait until `device` has finished its queued work (no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


class Clock:
    """Seconds from `time.perf_counter()`, read after synchronizing `device`."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def ms_since(self, start: float) -> float:
        """Milliseconds from `start` (a `now()` reading) to now."""
        return (self.now() - start) * 1e3
