"""Tenants: with salt_per_key, one API key's cached blocks and PML module states are invisible to another's."""

import pytest

from serving.app import tenant_salt

SCHEMA = '<schema name="t">Root text. <module name="m">A module about tenants and their caches.</module></schema>'
PML = '<prompt schema="t"><m/><user>Question?</user></prompt>'


@pytest.fixture(scope="module")
def setup():
    from fastapi.testclient import TestClient

    from prompt_cache.models import load_model
    from prompt_cache.prefix import PrefixConfig
    from serving.app import create_app
    from serving.server import ServeConfig, build_worker

    config = ServeConfig(model="tiny:llama", memory_only=True, prefix=PrefixConfig(block_size=4, min_prefix=0,
                                                                                   granularity=4))
    worker = build_worker(config, lm=load_model("tiny:llama"))
    app = create_app(worker, api_keys=("key-a", "key-b"), salt_per_key=True, served_names=("tiny:llama",))
    with TestClient(app) as client:
        yield client, worker
    worker.close()


def cached(client, key, **body):
    body = {"model": "tiny:llama", "max_tokens": 2, "temperature": 0, **body}
    r = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_prefix_blocks_are_per_key(setup):
    client, _ = setup
    msgs = [{"role": "user", "content": "The same question from two tenants, long enough to fill blocks."}]
    assert cached(client, "key-a", messages=msgs) == 0
    assert cached(client, "key-a", messages=msgs) > 0
    # Key b sends the same tokens: nothing of key a's is served, even with key a's body salt.
    assert cached(client, "key-b", messages=msgs) == 0
    assert cached(client, "key-b", messages=msgs, cache_salt="") > 0  # its own blocks now


def test_pml_module_states_are_per_key(setup):
    client, worker = setup
    r = client.post("/v1/schemas", json={"pml": SCHEMA}, headers={"x-api-key": "key-a"})
    assert r.status_code == 200
    cached(client, "key-a", messages=[], pml=PML)
    a = worker.tenant(tenant_salt("key-a", None))
    b = worker.tenant(tenant_salt("key-b", None))
    # Separate stores: key a's module states are in its store only, until key b uses the schema.
    assert a.store is not b.store and len(a.store.memory) > 0 and len(b.store.memory) == 0
    cached(client, "key-b", messages=[], pml=PML)
    assert len(b.store.memory) == len(a.store.memory)
