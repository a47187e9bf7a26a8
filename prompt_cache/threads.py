"""How many CPU threads torch uses: a default that holds up on a shared machine, and one way to set it.

torch starts one intra-op thread per core. When another process holds a core, every parallel region
waits for the thread that cannot run: measured here, a 19-token cached forward went from 0.6 s to
4.5 s beside one busy process. So the default is the cores this process may run on
(`os.sched_getaffinity`) minus the ones the 1-minute load average says are busy, at least one.
`PML_THREADS` or `--threads N` override it. OpenMP's passive wait policy (`OMP_WAIT_POLICY=PASSIVE`,
set by the `pml` command before torch loads unless already set) makes idle threads sleep instead of
spinning on a core another thread needs.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ENV = "PML_THREADS"


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """`$PML_THREADS` if set, else usable cores minus the busy ones (1-minute load average), at least 1."""
    if os.environ.get(ENV):
        return parse_threads(os.environ[ENV])
    cores = usable_cores()
    try:
        busy = int(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, cores - min(busy, cores - 1))


def parse_threads(text: str) -> int:
    """A thread count from text: a positive integer, else a ValueError saying so."""
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"threads must be a positive integer, not {text!r}") from None
    if n < 1:
        raise ValueError(f"threads must be a positive integer, not {n}")
    return n


def apply_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to `n` (None: `default_threads()`); returns the number used."""
    import torch

    n = default_threads() if n is None else n
    torch.set_num_threads(n)
    log.debug("torch threads: %d", n)
    return n
