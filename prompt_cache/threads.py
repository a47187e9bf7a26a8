"""How many CPU threads torch uses: a default that holds up on a shared machine, and one way to set it.

torch starts one intra-op thread per core. When another process holds a core, every parallel region
waits for the thread that cannot run: measured here, a 19-token cached forward went from 0.6 s to
4.5 s beside one busy process. So the default is the cores this process may run on
(`os.sched_getaffinity`) minus the ones the 1-minute load average says are busy, at least one.
`PML_THREADS` or `--threads N` override it. A server (`pml serve`) also leaves `SERVER_FRONT_END_CORES`
to its HTTP front end (event loop, tokenizer, streaming, the prefix cache's disk writes), as vLLM's
CPU backend reserves a core for its front-end process: a model thread that shares a core with
them stalls every parallel region, as beside any busy process. Measured here (2 cores, `pml bench
serving --skip repeat --clients 8 --requests 2 --max-tokens 32`, requests/s at 2 threads against
1): packed 1.853 / 1.859, one by one 0.828 / 1.048, no cache 0.635 / 0.730 on an idle machine;
beside a busy PyTorch job (`--contention 1`) 1.171 / 1.579, 0.480 / 0.963, 0.409 / 0.647.

How idle OpenMP threads wait between parallel regions is the other half (`wait_policy`, applied by
`pml` and `python -m experiments` before torch loads through `set_wait_policy`; `OMP_WAIT_POLICY` or
`GOMP_SPINCOUNT` set by the user win). A decode step opens a few hundred regions. `python scripts/probes/wait_policy.py` (fresh
processes, 2 threads, the speed benchmark's prompt, 32 tokens) measured decode tokens/s on an idle
machine: libgomp's default (spin 300,000 times, then sleep) 39.9-40.9, `PASSIVE` (never spin:
every region wakes its threads through the kernel) 24.2-25.1, slower than one thread's 30.7-31.5;
beside a busy PyTorch job: default 9.5-10.5, `PASSIVE` 26.5-27.5. So a process that starts on an
idle machine and is short-lived keeps libgomp's default, and one that starts beside busy cores
(where the thread default is 1 anyway, unless told otherwise) or runs for long (`pml serve`, which
will see neighbours come and go) gets `PASSIVE`.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

ENV = "PML_THREADS"
SERVER_FRONT_END_CORES = 1  # cores a server leaves to its HTTP front end (see the module docstring)


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def busy_cores() -> int:
    """Cores the 1-minute load average says other work holds (0 where it cannot be read)."""
    try:
        return int(os.getloadavg()[0])
    except OSError:
        return 0


def env_threads() -> int | None:
    """`$PML_THREADS` as a count (a ValueError saying so if it is not one), or None when unset."""
    return parse_threads(os.environ[ENV]) if os.environ.get(ENV) else None


def default_threads(reserve: int = 0) -> int:
    """`$PML_THREADS` if set, else usable cores minus the busy ones (1-minute load average) minus
    `reserve` (cores left to other work of this process), at least 1."""
    chosen = env_threads()
    return chosen if chosen is not None else max(1, usable_cores() - busy_cores() - reserve)


WAIT_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # what the user may set instead


def wait_policy(long_running: bool) -> dict[str, str]:
    """The OpenMP wait settings to add to the environment before torch loads (see the module
    docstring): none if the user set any of `WAIT_ENV`; `PASSIVE` for a long-running process or
    when a core is busy now; else none (libgomp's default: spin a while, then sleep)."""
    if any(k in os.environ for k in WAIT_ENV):
        return {}
    if long_running or busy_cores() > 0:
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {}


def set_wait_policy(long_running: bool) -> dict[str, str]:
    """Add `wait_policy(long_running)` to this process's environment, for a command's entry point
    (`pml`, `python -m experiments`) before anything imports torch: libgomp reads it once, at load,
    so later it would take no effect here and only pass on to child processes. Returns what it set."""
    if "torch" in sys.modules:
        log.debug("torch already loaded: OpenMP wait policy left as it is")
        return {}
    policy = wait_policy(long_running=long_running)
    os.environ.update(policy)
    return policy


def parse_threads(text: str) -> int:
    """A thread count from text: a positive integer, else a ValueError saying so."""
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"threads must be a positive integer, not {text!r}") from None
    if n < 1:
        raise ValueError(f"threads must be a positive integer, not {n}")
    return n


def apply_threads(n: int | None = None, reserve: int = 0) -> int:
    """Set torch's intra-op threads to `n` (None: `default_threads(reserve)`); returns the number used."""
    import torch

    n = default_threads(reserve) if n is None else n
    torch.set_num_threads(n)
    log.debug("torch threads: %d", n)
    return n
