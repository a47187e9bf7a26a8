"""A live server on 127.0.0.1 (free port, background thread) over the tiny random Llama, with a fake clock."""

from __future__ import annotations

import pytest

API_KEY = "test-key"


class FakeClock:
    """Monotonic seconds that only move when a test moves them."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def live():
    """(BackgroundServer, FakeClock): research caching settings (no minimum prefix, 4-token blocks)."""
    from prompt_cache.models import load_model
    from prompt_cache.prefix import PrefixConfig
    from serving.app import Limits
    from serving.server import BackgroundServer, ServeConfig, build_worker

    clock = FakeClock()
    config = ServeConfig(model="tiny:llama", memory_only=True, api_keys=(API_KEY,),
                         prefix=PrefixConfig(block_size=4, min_prefix=0, granularity=4),
                         limits=Limits(max_body_bytes=64 << 10, max_prompt_tokens=900, max_completion_tokens=64))
    worker = build_worker(config, lm=load_model("tiny:llama"), clock=clock)
    with BackgroundServer(worker, config) as server:
        yield server, clock
    worker.close()
