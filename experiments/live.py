"""Live `pml serve` processes for the benchmarks: started on a free 127.0.0.1 port, stopped on exit.

The benchmarks talk to the server over HTTP only (never importing `serving`), as a user's client
would: requests cross a real socket to another process.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(model: str, *flags: str, startup_s: float = 600.0, log: Path | None = None) -> Iterator[str]:
    """`pml serve --model MODEL FLAGS` on 127.0.0.1 in a subprocess; yields its base URL."""
    import httpx

    port = free_port()
    sink = open(log, "a") if log else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "pml_cli", "serve", "--model", model, "--host", "127.0.0.1",
                             "--port", str(port), *flags], cwd=ROOT, stdout=sink, stderr=sink)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"pml serve exited with {proc.returncode} before serving" +
                                   (f" (see {log})" if log else ""))
            if time.monotonic() > deadline:
                raise RuntimeError(f"pml serve did not answer /health within {startup_s:.0f} s")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            sink.close()
