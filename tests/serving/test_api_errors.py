"""Bad requests get the right 4xx in the provider's error shape, and the server keeps serving."""

import anthropic
import httpx
import openai
import pytest

from tests.serving.conftest import API_KEY

MODEL = "tiny:llama"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
GOOD = {"model": MODEL, "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def http(live):
    server, _ = live
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def still_serving(http):
    r = http.post("/v1/chat/completions", json=GOOD, headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_malformed_json_is_a_400_in_the_provider_shape(http, path):
    r = http.post(path, content=b'{"model": "tiny:llama", "messages": [', headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400
    body = r.json()
    if path == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    else:
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    still_serving(http)


def test_wrong_api_key_is_a_401_for_both_clients(live, http):
    server, _ = live
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert http.post("/v1/chat/completions", json=GOOD).status_code == 401  # no key at all
    still_serving(http)


def test_oversize_body_is_a_413(http):
    big = {**GOOD, "messages": [{"role": "user", "content": "x" * (70 << 10)}]}
    r = http.post("/v1/chat/completions", json=big, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    still_serving(http)


def test_oversize_chunked_body_is_a_413(http):
    def chunks():  # no content-length: the server must count the bytes itself
        yield b'{"model": "tiny:llama", "messages": [{"role": "user", "content": "'
        for _ in range(70):
            yield b"z" * 1024
        yield b'"}]}'

    r = http.post("/v1/chat/completions", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413
    still_serving(http)


def test_too_many_prompt_tokens_is_a_400(http):
    long = {**GOOD, "messages": [{"role": "user", "content": "y" * 1000}]}  # byte tokenizer: > 900 tokens
    r = http.post("/v1/chat/completions", json=long, headers=AUTH)
    assert r.status_code == 400 and "token limit" in r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/messages"])
def test_prompt_plus_max_tokens_past_the_context_is_a_400(http, path, monkeypatch):
    # The tiny model's context is 8,192, more than the test server's limits allow: pretend it is 40.
    import serving.app

    monkeypatch.setattr(serving.app, "model_context", lambda lm: 40)
    body = {**GOOD, "max_tokens": 30, "messages": [{"role": "user", "content": "hello there, friend"}]}
    if path == "/v1/completions":
        body = {"model": MODEL, "max_tokens": 30, "prompt": "hello there, friend"}
    r = http.post(path, json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "maximum context length is 40 tokens" in message and "30 in the completion" in message
    monkeypatch.undo()
    still_serving(http)


def test_an_empty_completion_prompt_is_a_400(live, http, monkeypatch):
    # Only a tokenizer without BOS turns "" into no tokens at all: take the tiny model's BOS away.
    server, _ = live
    monkeypatch.setattr(server.worker.lm.tokenizer, "bos_ids", ())
    for prompt, which in (("", "the prompt is empty"), (["hello", ""], "prompt 1 is empty")):
        r = http.post("/v1/completions", json={"model": MODEL, "max_tokens": 2, "prompt": prompt}, headers=AUTH)
        assert r.status_code == 400 and which in r.json()["error"]["message"]
    monkeypatch.undo()
    still_serving(http)


def test_pml_errors(http):
    def pml(text):
        return http.post("/v1/chat/completions", json={**GOOD, "messages": [], "pml": text}, headers=AUTH)

    # Unknown schema: 400 with the PML error line.
    r = pml('<prompt schema="nope"><user>hi</user></prompt>')
    assert r.status_code == 400 and "error:" in r.json()["error"]["message"] and "nope" in r.json()["error"]["message"]
    # Malformed PML: 400 whose message starts with LINE: error:.
    r = pml('<prompt schema="nope">\n<user>hi</prompt>')
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("2: error:")
    # A file path instead of PML text is refused, never opened.
    r = pml("/etc/passwd")
    assert r.status_code == 400 and "file paths are not accepted" in r.json()["error"]["message"]
    still_serving(http)


def test_schema_upload_errors(http):
    r = http.post("/v1/schemas", json={"pml": '<schema name="s"><module name="m" src="secret.txt"/></schema>'},
                  headers=AUTH)
    assert r.status_code == 400 and "src=" in r.json()["error"]["message"]
    r = http.post("/v1/schemas", json={"pml": "<schema name='s'><module>"}, headers=AUTH)
    assert r.status_code == 400
    assert http.delete("/v1/schemas/none-such", headers=AUTH).status_code == 404
    ok = http.post("/v1/schemas", json={"pml": '<schema name="gone"><module name="m">text</module></schema>'},
                   headers=AUTH)
    assert ok.status_code == 200
    assert http.delete("/v1/schemas/gone", headers=AUTH).status_code == 200
    r = http.post("/v1/chat/completions", json={**GOOD, "messages": [],
                                                 "pml": '<prompt schema="gone"><m/><user>q</user></prompt>'}, headers=AUTH)
    assert r.status_code == 400  # deleted: unknown again


def test_bad_parameters_and_unknown_model(http):
    assert http.post("/v1/chat/completions", json={**GOOD, "temperature": -1}, headers=AUTH).status_code == 400
    assert http.post("/v1/chat/completions", json={**GOOD, "max_tokens": 10**6}, headers=AUTH).status_code == 400
    assert http.post("/v1/chat/completions", json={**GOOD, "messages": [{"role": "wizard", "content": "x"}]},
                     headers=AUTH).status_code == 400
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    r = http.post("/v1/chat/completions", json={**GOOD, "tools": tools}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    r = http.post("/v1/messages", json={**GOOD, "tools": [{"name": "f", "input_schema": {}}]}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = http.post("/v1/chat/completions", json={**GOOD, "model": "gpt-9"}, headers=AUTH)
    assert r.status_code == 404 and "not served" in r.json()["error"]["message"]
    still_serving(http)
