"""Build a server from a frozen config, and run it (blocking, or in a background thread for tests and benchmarks)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from prompt_cache import DEFAULT_MODEL
from prompt_cache.prefix import PrefixConfig
from serving.app import Limits, create_app
from serving import DEFAULT_MAX_BATCH
from serving.worker import Worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    model: str = DEFAULT_MODEL  # registry name, model folder, or tiny:<arch>
    store: str | None = None  # store folder (None: the per-model default under the user cache)
    memory_only: bool = False  # no disk tier (tests)
    host: str = "127.0.0.1"
    port: int = 8000  # 0: a free port
    schemas: tuple[str, ...] = ()  # PML schema files registered (and pinned) at start, read by the operator
    api_keys: tuple[str, ...] = ()  # accepted keys; empty = no authentication
    salt_per_key: bool = False  # isolate each API key's cache (the key goes into every cache salt)
    threads: int | None = None  # torch threads of the model worker (None: prompt_cache.threads' default)
    use_cache: bool = True  # False (--no-cache): every prompt fully computed, nothing stored
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    limits: Limits = field(default_factory=Limits)
    semantic_threshold: float | None = None  # answer near-identical questions from earlier answers (L1); None: off
    max_batch: int = DEFAULT_MAX_BATCH  # concurrent PML requests answered in one packed batch at most (1: none)


def build_worker(config: ServeConfig, lm=None, clock: Callable[[], float] = time.monotonic) -> Worker:
    """Load the model (unless given), open the store, register the operator's schemas."""
    from attention_store.store import AttentionStore, open_store
    from attention_store.tiers import MemoryTier

    if lm is None:
        from prompt_cache.models import load_model

        lm = load_model(config.model)
    store = AttentionStore(MemoryTier(device=lm.model.device), None) if config.memory_only else open_store(config.store, lm)
    semantic = None
    if config.semantic_threshold is not None:
        from prompt_cache.semantic import SemanticCache, SemanticCacheConfig
        from prompt_cache.semantic.embedder import MiniLMEmbedder

        semantic = SemanticCache(MiniLMEmbedder(), SemanticCacheConfig(threshold=config.semantic_threshold))
    worker = Worker(lm, store, config.prefix, use_cache=config.use_cache, clock=clock, threads=config.threads,
                    semantic=semantic, max_batch=config.max_batch)
    for path in config.schemas:
        # Operator-given files, read here; the HTTP API itself only ever takes PML text.
        worker.add_schema(Path(path).read_text(encoding="utf-8"), pin=True)
    return worker


def serve(config: ServeConfig, worker: Worker | None = None) -> None:
    """Run until interrupted (uvicorn handles SIGINT/SIGTERM)."""
    import uvicorn

    worker = worker or build_worker(config)
    app = create_app(worker, api_keys=config.api_keys, salt_per_key=config.salt_per_key, limits=config.limits,
                     served_names=(config.model,))
    log.info("serving %s on http://%s:%d", worker.lm.name, config.host, config.port)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        worker.close()


class BackgroundServer:
    """A live uvicorn server on a free 127.0.0.1 port, in a daemon thread. `with BackgroundServer(...) as s: s.url`."""

    def __init__(self, worker: Worker, config: ServeConfig = ServeConfig()):
        import uvicorn

        self.worker = worker
        self.app = create_app(worker, api_keys=config.api_keys, salt_per_key=config.salt_per_key,
                              limits=config.limits, served_names=(config.model,))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
