"""The HTTP layer: OpenAI- and Anthropic-shaped endpoints that hand requests to the model worker.

Thin by design (as vLLM's api_server): parse and check a request, render it to token ids or a PML
prompt, queue it on the worker, and shape the worker's `Completion` as the provider's response.
Errors come back in the provider's own JSON error shape with a 4xx status.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import time
import uuid
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pml.errors import PMLError
from prompt_cache.generation import GenerationConfig
from prompt_cache.limits import model_context
from prompt_cache.semantic.engine_hook import pml_context
from serving import protocol as P
from serving.metrics import Metrics
from serving.render import Block, Message, RenderError, render_chat, render_text
from serving.worker import Worker

log = logging.getLogger(__name__)

TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
MAX_BREAKPOINTS = 4  # Anthropic: at most 4 cache_control blocks per request
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/messages": "messages",
             "/v1/schemas": "schemas"}  # path -> metrics label


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 4 << 20  # request body size; bigger is a 413
    max_prompt_tokens: int = 32768  # prompt tokens after rendering; more is a 400
    max_completion_tokens: int = 4096  # cap on max_tokens


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error_body(path: str, status: int, message: str, kind: str, param: str | None = None) -> dict:
    if path.startswith("/v1/messages"):
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _kind(status: int) -> str:
    return {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
            405: "invalid_request_error"}.get(status, "invalid_request_error" if status < 500 else "api_error")


def create_app(worker: Worker, *, api_keys: tuple[str, ...] = (), salt_per_key: bool = False,
               limits: Limits = Limits(), served_names: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app over a ready worker. `api_keys` empty: no authentication."""
    app = FastAPI(title="pml serve", description="OpenAI- and Anthropic-compatible API with prompt caching")
    metrics = Metrics()
    names = tuple(dict.fromkeys((worker.lm.name, *served_names)))
    app.state.worker, app.state.metrics = worker, metrics

    def fail(request: Request, status: int, message: str, kind: str | None = None, param=None):
        # A fixed label set: a client's arbitrary paths must not grow the metric without bound.
        metrics.requests.labels(ENDPOINTS.get(request.url.path, "other"), str(status)).inc()
        return JSONResponse(_error_body(request.url.path, status, message, kind or _kind(status), param), status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return fail(request, e.status, e.message, e.kind, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return fail(request, 400, msg, param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return fail(request, e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("request %s failed", request.url.path)
        return fail(request, 500, f"internal error: {type(e).__name__}")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is None and request.method in ("POST", "PUT", "PATCH"):
            # A chunked body has no length up front: read it (Starlette keeps it for the handler).
            size = str(len(await request.body()))
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            return fail(request, 413, f"request body of {size} bytes is over the {limits.max_body_bytes} byte limit")
        if api_keys and request.url.path.startswith("/v1/"):
            if _key(request) not in api_keys:
                return fail(request, 401, "missing or wrong API key (Authorization: Bearer KEY or x-api-key: KEY)")
        return await call_next(request)

    def salt_of(request: Request, body_salt: str | None) -> str:
        return tenant_salt(_key(request) if salt_per_key else None, body_salt)

    def check_model(model: str) -> None:
        if model not in names:
            raise ApiError(404, f"model {model!r} is not served here (served: {', '.join(names)})",
                           "not_found_error", "model")

    def unsupported(body) -> None:
        # Ignoring these would answer a different question than the one asked: refuse them.
        for name in ("tools", "functions", "response_format", "logprobs"):
            if (body.model_extra or {}).get(name):
                raise ApiError(400, f"`{name}` is not supported by this server (describe tools in the system "
                                    "prompt instead)", param=name)

    def check_prompt(n: int, max_tokens: int) -> None:
        if n > limits.max_prompt_tokens:
            raise ApiError(400, f"prompt has {n} tokens, over the {limits.max_prompt_tokens} token limit")
        context = model_context(worker.lm)
        if n + max_tokens > context:  # OpenAI's and vLLM's rule and wording (context_length_exceeded)
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the completion). "
                                "Please reduce the length of the prompt or of max_tokens.")

    def completion_ids(text: str, config: GenerationConfig, which: str = "the prompt") -> list[int]:
        """A /v1/completions prompt's token ids (BOS + text), checked against the limits."""
        ids = render_text(worker.lm.tokenizer, text)
        if not ids:
            raise ApiError(400, f"{which} is empty", param="prompt")
        check_prompt(len(ids), config.max_new_tokens)
        return ids

    def gen_config(max_tokens, temperature, top_p, seed, stop) -> GenerationConfig:
        if max_tokens is None:
            max_tokens = limits.max_completion_tokens
        if max_tokens > limits.max_completion_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is over the limit of {limits.max_completion_tokens}",
                           param="max_tokens")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stop=stops)

    async def run(endpoint: str, fn, stream: bool, shape, request: Request):
        """Run `fn(on_text=...)` on the worker; a JSON response, or an SSE stream built by `shape`."""
        if not stream:
            try:
                done = await _on_worker(worker, functools.partial(fn, on_text=None, endpoint=endpoint))
            except PMLError as e:
                raise ApiError(400, str(e)) from None
            metrics.observe(endpoint, done)
            metrics.requests.labels(endpoint, "200").inc()
            return JSONResponse(shape.final(done))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        on_text = lambda s: loop.call_soon_threadsafe(queue.put_nowait, s)  # noqa: E731
        future = asyncio.ensure_future(_on_worker(worker, functools.partial(fn, on_text=on_text, endpoint=endpoint)))
        future.add_done_callback(lambda _: queue.put_nowait(None))
        # Headers wait for the first text (or the end): a request that fails before any text, such
        # as a malformed PML prompt, still gets its 400 rather than an error inside a 200 stream.
        first = await queue.get()
        if first is None and isinstance(future.exception(), PMLError):
            raise ApiError(400, str(future.exception())) from None

        async def events():
            yield shape.start()
            piece = first
            while piece is not None:
                yield shape.delta(piece)
                piece = await queue.get()
            try:
                done = future.result()
            except Exception as e:  # noqa: BLE001 - the status is sent; the error goes in the stream
                log.warning("stream %s failed: %s", endpoint, e)
                yield _sse(_error_body(request.url.path, 400, str(e), "invalid_request_error"),
                           "error" if isinstance(shape, _AnthropicShape) else None)
                return
            metrics.observe(endpoint, done)
            metrics.requests.labels(endpoint, "200").inc()
            for event in shape.end(done):
                yield event

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def respond(endpoint: str, fn, stream: bool, shape, request: Request, semantic=None):
        """`run`, behind the semantic cache when the server has one: `semantic` is (question, context
        dict, config, salt). Every response then carries `x-semantic-cache: hit|miss`."""
        if worker.semantic is None or semantic is None:
            return await run(endpoint, fn, stream, shape, request)
        hit, req = await worker.run(worker.semantic_begin, endpoint, *semantic)
        if hit is not None:
            response = await run(endpoint, functools.partial(worker.replay, hit), stream, shape, request)
        else:
            remember = functools.partial(worker.semantic_remember, req)
            response = await run(endpoint, functools.partial(fn, remember=remember), stream, shape, request)
        result = "miss" if hit is None else "hit"
        response.headers["x-semantic-cache"] = result
        metrics.semantic.labels(result).inc()
        return response

    # -- OpenAI ------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        check_model(body.model)
        unsupported(body)
        config = gen_config(body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
                            body.temperature, body.top_p, body.seed, body.stop)
        salt = salt_of(request, body.cache_salt)
        if (body.pml is None) == (not body.messages):
            # The openai client always sends `messages`; with `pml`, send it empty.
            raise ApiError(400, "give either non-empty `messages` or `pml` (a PML prompt, as extra_body) "
                                "with empty messages", param="messages")
        if body.pml is not None:
            fn = functools.partial(worker.answer_pml_queued, _xml(body.pml), config, salt)  # packed with concurrent ones
            question = context = None
            if worker.semantic is not None:  # its key needs the bound prompt; else binding happens once, in the answer
                try:
                    s, bound = await worker.run(worker.tenant(salt).bind, body.pml)
                except PMLError as e:
                    raise ApiError(400, str(e), param="pml") from None
                question, context = pml_context(body.pml, s, bound)
        else:
            messages = [_openai_message(m) for m in body.messages]
            try:
                rendered = render_chat(worker.lm.tokenizer, messages)
            except RenderError as e:
                raise ApiError(400, str(e), param="messages") from None
            check_prompt(len(rendered.ids), config.max_new_tokens)
            fn = functools.partial(worker.complete, rendered.ids, config, salt)
            question, context = _chat_question(messages)
        shape = _ChatShape(body.model, body.stream_options is not None and body.stream_options.include_usage)
        return await respond("chat", fn, body.stream, shape, request, (question, context, config, salt))

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        check_model(body.model)
        prompt = body.prompt
        config = gen_config(body.max_tokens, body.temperature, body.top_p, body.seed, body.stop)
        if isinstance(prompt, list):
            if not prompt:
                raise ApiError(400, "the prompt list is empty", param="prompt")
            if len(prompt) > 1:
                return await several_completions(body, prompt, config, request)
            prompt = prompt[0]
        ids = completion_ids(prompt, config)
        salt = salt_of(request, body.cache_salt)
        fn = functools.partial(worker.complete, ids, config, salt)
        shape = _CompletionShape(body.model, body.stream_options is not None and body.stream_options.include_usage)
        # A plain prompt is all question: it hits only a near-identical prompt.
        return await respond("completions", fn, body.stream, shape, request, (prompt, {}, config, salt))

    async def several_completions(body: P.CompletionRequest, prompts: list[str], config: GenerationConfig,
                                  request: Request):
        """OpenAI's list of prompts: one choice per prompt (`index` = its place), usage summed. Each
        prompt is its own request to the worker, through the prefix cache; the semantic cache is
        not consulted (its key is one question)."""
        if body.stream:
            raise ApiError(400, "stream several prompts as separate requests (a list of prompts is answered "
                                "without streaming)", param="stream")
        ids = [completion_ids(text, config, f"prompt {i}") for i, text in enumerate(prompts)]
        salt = salt_of(request, body.cache_salt)
        done = [await worker.run(functools.partial(worker.complete, x, config, salt, endpoint="completions"))
                for x in ids]
        for c in done:
            metrics.observe("completions", c)
        metrics.requests.labels("completions", "200").inc()
        shape = _CompletionShape(body.model, False)
        total = replace(done[0], **{f: sum(getattr(c, f) for c in done) for f in
                                                ("prompt_tokens", "cached_tokens", "written_tokens",
                                                 "completion_tokens", "reported_cached")})
        return JSONResponse({**shape.final(total), "choices": [
            {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
            for i, c in enumerate(done)]})

    # -- Anthropic ---------------------------------------------------------------------------------
    @app.post("/v1/messages")
    async def messages(body: P.MessagesRequest, request: Request):
        check_model(body.model)
        unsupported(body)
        config = gen_config(body.max_tokens, body.temperature, body.top_p, None, body.stop_sequences)
        msgs = []
        if body.system is not None:
            msgs.append(Message("system", _blocks(body.system)))
        msgs += [Message(m.role, _blocks(m.content)) for m in body.messages]
        if body.cache_control is not None and msgs:
            # Top-level cache_control (automatic caching): a breakpoint on the last block.
            *head, last = msgs[-1].blocks
            msgs[-1] = Message(msgs[-1].role, (*head, Block(last.text, TTL_SECONDS[body.cache_control.ttl], True)))
        rendered = render_chat(worker.lm.tokenizer, msgs)
        if len(rendered.breakpoints) > MAX_BREAKPOINTS:
            raise ApiError(400, f"at most {MAX_BREAKPOINTS} blocks may have cache_control; got "
                                f"{len(rendered.breakpoints)}")
        check_prompt(len(rendered.ids), config.max_new_tokens)
        # Anthropic reads and writes the cache only up to breakpoints; without one, nothing is cached.
        last = max((at for at, _ in rendered.breakpoints), default=0)
        salt = salt_of(request, body.cache_salt)
        fn = functools.partial(worker.complete, rendered.ids, config, salt, last, rendered.breakpoints)
        question, context = _chat_question(msgs)
        return await respond("messages", fn, body.stream, _AnthropicShape(body.model, config), request,
                             (question, context, config, salt))

    # -- schemas, models, health, metrics ----------------------------------------------------------
    @app.post("/v1/schemas")
    async def add_schema(body: P.SchemaUpload):
        try:
            record = await worker.run(worker.add_schema, body.pml, body.pin)
        except PMLError as e:
            raise ApiError(400, str(e), param="pml") from None
        return {"name": record.name, "sha256": record.sha256, "pinned": body.pin}

    @app.get("/v1/schemas")
    async def list_schemas():
        with worker.lock:
            rows = [{"name": r.name, "sha256": r.sha256, "pinned": r.name in worker.pinned}
                    for r in worker.schemas.values()]
        return {"object": "list", "data": rows}

    @app.delete("/v1/schemas/{name}")
    async def delete_schema(name: str):
        if not await worker.run(worker.delete_schema, name):
            raise ApiError(404, f"no schema named {name!r}", "not_found_error")
        return {"name": name, "deleted": True}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "pml"} for n in names]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": worker.lm.name,
                "dtype": str(next(worker.lm.model.parameters()).dtype).removeprefix("torch.")}

    @app.get("/metrics")
    async def prometheus():
        text = await asyncio.get_running_loop().run_in_executor(None, metrics.render, worker)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/usage")
    async def usage():
        """Server-wide totals since start (cost accounting)."""
        with worker.lock:
            t = worker.totals
            return {"requests": t.requests, "prompt_tokens": t.prompt_tokens, "cached_tokens": t.cached_tokens,
                    "cache_written_tokens": t.written_tokens, "completion_tokens": t.completion_tokens,
                    "semantic_hits": t.semantic_hits, "batches": t.batches, "batched_requests": t.batched_requests,
                    "requests_by_endpoint": dict(t.by_endpoint)}

    return app


# -- helpers ---------------------------------------------------------------------------------------
def tenant_salt(api_key: str | None, body_salt: str | None) -> str:
    """The cache salt of a request: the body's `cache_salt`, bound to the API key under `salt_per_key`
    (a tenant then cannot choose another tenant's salt; its body salt splits its own cache further)."""
    if api_key is None:
        return body_salt or ""
    return json.dumps(["key", api_key, body_salt or ""])  # unambiguous whatever the key or salt holds


def _key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def _on_worker(worker: Worker, call):
    """Await `call` on the model thread: a coroutine function queues itself (PML requests, which the
    worker may pack into one batch); a plain function is run there as is."""
    return call() if inspect.iscoroutinefunction(call) else worker.run(call)


def _xml(text: str) -> str:
    if not text.lstrip().startswith("<"):
        raise ApiError(400, "pml must be PML text starting with '<' (file paths are not accepted)", param="pml")
    return text


def _chat_question(messages: list[Message]) -> tuple[str, dict]:
    """For the semantic cache: the last message's text is the question; every other message (system
    prompt, history) and the last message's role are its context, which must match exactly."""
    text = lambda m: "".join(b.text for b in m.blocks)  # noqa: E731
    *history, last = messages
    return text(last), {"history": [(m.role, text(m)) for m in history], "role": last.role}


def _openai_message(m: P.ChatMessage) -> Message:
    if m.content is None:
        text = ""
    elif isinstance(m.content, str):
        text = m.content
    else:
        text = "".join(p.text for p in m.content)
    return Message(m.role, (Block(text),))


def _blocks(content) -> tuple[Block, ...]:
    if isinstance(content, str):
        return (Block(content),)
    return tuple(Block(b.text, TTL_SECONDS[b.cache_control.ttl] if b.cache_control else None,
                       b.cache_control is not None) for b in content)


def _sse(data: dict | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def _openai_usage(c) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": c.reported_cached}}


class _ChatShape:
    obj, chunk_obj = "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str, include_usage: bool):
        self.model, self.include_usage = model, include_usage
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def _chunk(self, choices: list, usage=None) -> str:
        body = {"id": self.id, "object": self.chunk_obj, "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return _sse(body)

    def start(self) -> str:
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])

    def delta(self, text: str) -> str:
        return self._chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None}])

    def end(self, c):
        yield self._chunk([{"index": 0, "delta": {}, "finish_reason": c.finish_reason}])
        if self.include_usage:
            yield self._chunk([], _openai_usage(c))
        yield _sse("[DONE]")

    def final(self, c) -> dict:
        return {"id": self.id, "object": self.obj, "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason, "logprobs": None}],
                "usage": _openai_usage(c)}


class _CompletionShape(_ChatShape):
    obj = chunk_obj = "text_completion"

    def start(self) -> str:
        return self._chunk([{"index": 0, "text": "", "finish_reason": None, "logprobs": None}])

    def delta(self, text: str) -> str:
        return self._chunk([{"index": 0, "text": text, "finish_reason": None, "logprobs": None}])

    def end(self, c):
        yield self._chunk([{"index": 0, "text": "", "finish_reason": c.finish_reason, "logprobs": None}])
        if self.include_usage:
            yield self._chunk([], _openai_usage(c))
        yield _sse("[DONE]")

    def final(self, c) -> dict:
        return {"id": self.id, "object": self.obj, "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}],
                "usage": _openai_usage(c)}


class _AnthropicShape:
    def __init__(self, model: str, config: GenerationConfig):
        self.model, self.config = model, config
        self.id = f"msg_{uuid.uuid4().hex[:24]}"

    @staticmethod
    def usage(c) -> dict:
        return {"input_tokens": c.prompt_tokens - c.cached_tokens - c.written_tokens,
                "output_tokens": c.completion_tokens, "cache_creation_input_tokens": c.written_tokens,
                "cache_read_input_tokens": c.cached_tokens}

    def _stop(self, c) -> tuple[str, str | None]:
        if c.finish_reason == "length":
            return "max_tokens", None
        return ("stop_sequence", c.stop_sequence) if c.stop_sequence else ("end_turn", None)

    def _message(self, content: list, usage: dict, stop=(None, None)) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage}

    def start(self) -> str:
        # Usage is only known once the worker ran; message_delta carries the final counts.
        zero = {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        return (_sse({"type": "message_start", "message": self._message([], zero)}, "message_start")
                + _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                       "content_block_start"))

    def delta(self, text: str) -> str:
        return _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
                    "content_block_delta")

    def end(self, c):
        stop = self._stop(c)
        yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        yield _sse({"type": "message_delta", "delta": {"stop_reason": stop[0], "stop_sequence": stop[1]},
                    "usage": self.usage(c)}, "message_delta")
        yield _sse({"type": "message_stop"}, "message_stop")

    def final(self, c) -> dict:
        return self._message([{"type": "text", "text": c.text}], self.usage(c), self._stop(c))
