"""The Anthropic Messages endpoint through the real `anthropic` client: cache_control, usage fields, TTL."""

import anthropic
import pytest

from tests.serving.conftest import API_KEY

MODEL = "tiny:llama"


@pytest.fixture(scope="module")
def client(live):
    server, _ = live
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)


def ask(client, system_text, question="What is here?", ttl="5m", cache=True, **kw):
    block = {"type": "text", "text": system_text}
    if cache:
        block["cache_control"] = {"type": "ephemeral", "ttl": ttl}
    # This client version has no `temperature` argument; the server still reads the field.
    return client.messages.create(model=MODEL, max_tokens=kw.pop("max_tokens", 5), system=[block],
                                  messages=[{"role": "user", "content": question}], extra_body={"temperature": 0},
                                  **kw)


def test_breakpoint_writes_then_reads_and_the_usage_adds_up(client):
    system = "Tool list: search(query), open(url), click(id). Answer briefly. " * 2
    first, second = ask(client, system), ask(client, system)
    u1, u2 = first.usage, second.usage
    # First: the blocks up to the breakpoint are written (cache creation), nothing read.
    assert u1.cache_read_input_tokens == 0 < u1.cache_creation_input_tokens
    # Second: the same blocks read, nothing written.
    assert u2.cache_creation_input_tokens == 0 and u2.cache_read_input_tokens == u1.cache_creation_input_tokens
    total = lambda u: u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens  # noqa: E731
    assert total(u1) == total(u2) and u1.input_tokens > 0
    assert first.content[0].text == second.content[0].text
    assert first.stop_reason in ("end_turn", "max_tokens") and first.role == "assistant"


def test_without_cache_control_nothing_is_cached(client):
    system = "An uncached system prompt with enough words in it. " * 2
    for _ in range(2):
        u = ask(client, system, cache=False).usage
        assert u.cache_read_input_tokens == 0 and u.cache_creation_input_tokens == 0


def test_stream_matches_and_reports_usage(client):
    system = "Streaming system prompt, cached at its end. " * 2
    whole = ask(client, system, max_tokens=8)
    with client.messages.stream(model=MODEL, max_tokens=8, extra_body={"temperature": 0},
                                system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
                                messages=[{"role": "user", "content": "What is here?"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text
    assert final.usage.cache_read_input_tokens == whole.usage.cache_read_input_tokens + \
        whole.usage.cache_creation_input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens


def cached(usage):
    """Prompt tokens at or before the breakpoint that were in the cache after the request."""
    return usage.cache_read_input_tokens + usage.cache_creation_input_tokens


def test_ttl_expires_unless_refreshed_by_a_hit(client, live):
    _, clock = live
    system = "A prompt whose cache entry lives five minutes unless it is read. " * 2
    seen = cached(ask(client, system).usage)
    clock.now += 290
    assert ask(client, system).usage.cache_read_input_tokens == seen  # hit at 290 s refreshes ...
    clock.now += 290
    assert ask(client, system).usage.cache_read_input_tokens == seen  # ... so at 580 s it is alive
    clock.now += 301
    late = ask(client, system).usage
    # 301 s after the last hit every block of this server (all written with 5 m TTLs) has expired:
    # nothing is read, all of it is written again.
    assert late.cache_read_input_tokens == 0 and late.cache_creation_input_tokens == seen


def test_one_hour_ttl_outlives_five_minutes(client, live):
    _, clock = live
    system = "A prompt cached for an hour, for long agent sessions. " * 2
    seen = cached(ask(client, system, ttl="1h").usage)
    clock.now += 1800
    assert ask(client, system, ttl="1h").usage.cache_read_input_tokens == seen
    short = "A prompt cached for five minutes only, then forgotten. " * 2
    seen = cached(ask(client, short).usage)
    clock.now += 400
    # Its own blocks expired; only the leading blocks it shares with the 1 h prompt (BOS and the
    # system affix) are still there.
    assert ask(client, short).usage.cache_read_input_tokens < seen


def test_more_than_four_breakpoints_is_a_400(client):
    blocks = [{"type": "text", "text": f"part {i}. ", "cache_control": {"type": "ephemeral"}} for i in range(5)]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL, max_tokens=2, system=blocks, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 400 and "at most 4" in str(e.value)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"


def test_top_level_cache_control_caches_the_whole_conversation(client):
    msgs = [{"role": "user", "content": "A conversation cached automatically at its last message."}]
    kw = dict(model=MODEL, max_tokens=3, messages=msgs, extra_body={"temperature": 0},
              cache_control={"type": "ephemeral"})
    first, second = client.messages.create(**kw).usage, client.messages.create(**kw).usage
    assert first.cache_creation_input_tokens > 0 and second.cache_read_input_tokens == first.cache_creation_input_tokens
