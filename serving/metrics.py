"""Prometheus metrics of one server (its own registry, so several servers in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)  # seconds


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pml_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("pml_prompt_tokens", "prompt tokens, computed or served from the cache",
                                     ["kind"], registry=r)
        self.written_tokens = Counter("pml_cache_written_tokens", "prompt tokens stored in the cache", registry=r)
        self.completion_tokens = Counter("pml_completion_tokens", "generated tokens", registry=r)
        self.hit_rate = Gauge("pml_cache_hit_rate", "cached / prompt tokens since start", registry=r)
        self.store_bytes = Gauge("pml_store_bytes", "bytes of attention states per tier", ["tier"], registry=r)
        self.evictions = Gauge("pml_memory_evictions", "entries evicted from the memory tier since start", registry=r)
        self.expirations = Gauge("pml_prefix_expirations", "prefix blocks dropped at TTL expiry since start",
                                 registry=r)
        self.semantic = Counter("pml_semantic_cache", "requests looked up in the semantic cache, by result",
                                ["result"], registry=r)
        self.batched = Gauge("pml_batched_requests", "PML requests answered in a packed batch of 2+ since start",
                             registry=r)
        self.batches = Gauge("pml_batches", "packed batches of 2+ PML requests since start", registry=r)
        self.ttft = Histogram("pml_ttft_seconds", "time to first token", ["endpoint"], buckets=TTFT_BUCKETS,
                              registry=r)

    def observe(self, endpoint: str, completion) -> None:
        """Count one finished generation (a `serving.worker.Completion`)."""
        self.prompt_tokens.labels("cached").inc(completion.cached_tokens)
        self.prompt_tokens.labels("computed").inc(completion.prompt_tokens - completion.cached_tokens)
        self.written_tokens.inc(completion.written_tokens)
        self.completion_tokens.inc(completion.completion_tokens)
        self.ttft.labels(endpoint).observe(completion.ttft_ms / 1e3)

    def render(self, worker) -> bytes:
        """The exposition text, with the gauges read from the worker now."""
        with worker.lock:
            t = worker.totals
            self.hit_rate.set(t.cached_tokens / t.prompt_tokens if t.prompt_tokens else 0.0)
            self.batched.set(t.batched_requests)
            self.batches.set(t.batches)
        for tier, n in worker.memory_bytes().items():
            self.store_bytes.labels(tier).set(n)
        memory = worker.store.memory
        self.evictions.set(getattr(memory, "evictions", 0) if memory is not None else 0)
        self.expirations.set(worker.prefix.stats.expirations)
        return generate_latest(self.registry)
