"""Random JSON bodies on every POST endpoint: always a 2xx or a 4xx in the provider's error shape, never a 500."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 5000) | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
                    max_leaves=12)
FIELDS = ["model", "messages", "max_tokens", "temperature", "top_p", "stop", "stream", "pml", "prompt", "system",
          "cache_control", "cache_salt", "seed", "max_completion_tokens", "role", "content", "type", "text"]
# Bodies shaped like requests (the fields the server reads, random values) and fully random JSON.
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6) | JSON


@pytest.fixture(scope="module")
def app_client():
    from fastapi.testclient import TestClient

    from prompt_cache.models import load_model
    from serving.app import Limits, create_app
    from serving.server import ServeConfig, build_worker

    config = ServeConfig(model="tiny:llama", memory_only=True)
    worker = build_worker(config, lm=load_model("tiny:llama"))
    app = create_app(worker, limits=Limits(max_completion_tokens=2), served_names=("tiny:llama",))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
    worker.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/schemas"]), body=BODIES)
def test_random_bodies_never_crash(app_client, path, body):
    r = app_client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()
        if path == "/v1/messages":
            assert err["type"] == "error" and err["error"]["message"]
        else:
            assert err["error"]["message"] and err["error"]["type"]
