"""The OpenAI-compatible HTTP app (FastAPI) on an AsyncEngine: routes, errors in OpenAI's shape, server-sent events.

    app = create_app(async_engine, model_name="smollm2", api_key=None, max_waiting=256)
    jaxinfer.server.serve.run(app, host="127.0.0.1", port=8000)    # SIGTERM drains, then exits 0

Every request's prompt is tokenized here (so `usage` counts what the engine computes), then each of its choices is
one engine request; a stream interleaves the choices' tokens as they come. A client gone cancels the response's
work, which aborts its engine requests (streamed or not). A bad body is a 400 naming the field; nothing about it
reaches the engine. In front of every route a gate answers 503 while the server drains, 401 without the API key
(`/health` and `/metrics` stay open) and counts the requests in flight (what a drain waits for); a body over
`max_body_bytes` is a 413 and a request that would queue more than `max_waiting` beyond the engine's slots a 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from jaxinfer.engine.async_engine import AsyncEngine, EngineDeadError
from jaxinfer.errors import ParameterError
from jaxinfer.server import DEFAULT_MAX_WAITING
from jaxinfer.server import metrics as metrics_lib
from jaxinfer.server import protocol
from jaxinfer.server.protocol import ProtocolError

DEFAULT_MAX_BODY_BYTES = 16 * 2**20
OPEN_PATHS = frozenset({"/health", "/metrics"})  # answered without the API key


@dataclasses.dataclass
class ServerState:
    draining: bool = False  # set by the SIGTERM drain (serve.py): every new request gets a 503
    in_flight: int = 0  # HTTP requests being answered, a stream until its last event
    cut: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # the drain's time is up: end them all
    stats: metrics_lib.ServerStats = dataclasses.field(default_factory=metrics_lib.ServerStats)


def create_app(
    engine: AsyncEngine, model_name: str, *, api_key: str | None = None, max_waiting: int = DEFAULT_MAX_WAITING,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    app = FastAPI(title="jaxinfer", docs_url=None, redoc_url=None)
    state = app.state.server = ServerState()
    tokenizer = engine.engine.tokenizer
    max_model_len = engine.engine.max_model_len
    queue_limit = engine.engine.max_slots + max_waiting

    def token_text(token_id: int) -> str:  # a logprobs entry's token
        return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else f"token_id:{token_id}"

    app.add_middleware(_Gate, state=state, api_key=api_key)

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, e: ProtocolError):
        return _error(e.status, e.message, e.param, e.code)

    @app.exception_handler(ParameterError)
    async def _parameter_error(request: Request, e: ParameterError):  # a check below the protocol's own
        return _error(400, str(e), e.param)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, e: EngineDeadError):
        return _error(503, str(e))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        return _error(e.status_code, str(e.detail))

    async def body_of(request: Request) -> dict:
        return await _body(request, model_name, max_body_bytes)

    @app.get("/health")
    async def health():
        if engine.dead:
            return _error(503, "the engine stopped")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        body = metrics_lib.render(engine.metrics(), state.stats, model_name)
        return Response(body, media_type=metrics_lib.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_name, max_model_len)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != model_name:
            raise ProtocolError("model", f"the model {name!r} does not exist", 404, "model_not_found")
        return _model_card(model_name, max_model_len)

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed = protocol.parse_completion(await body_of(request))
        prompts = [_prompt_ids(c.prompt, tokenizer) for c in parsed.choices]
        return await respond(request, parsed, prompts, parsed.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        parsed, messages = protocol.parse_chat(await body_of(request))
        ids = _chat_ids(messages, tokenizer, model_name)
        max_tokens = parsed.max_tokens if parsed.max_tokens is not None else max(max_model_len - len(ids), 1)
        return await respond(request, parsed, [ids] * len(parsed.choices), max_tokens, chat=True)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        text, messages, add_special_tokens, add_generation_prompt = protocol.parse_tokenize(await body_of(request))
        if messages is not None:
            ids = _chat_ids(messages, tokenizer, model_name, add_generation_prompt)
        else:
            ids = _prompt_ids(text, tokenizer, add_special_tokens)
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        ids = protocol.parse_detokenize(await body_of(request), engine.engine.model.cfg.vocab_size)
        if tokenizer is None:
            raise ProtocolError("tokens", f"the model {model_name!r} has no tokenizer")
        return {"prompt": tokenizer.decode(ids, skip_special_tokens=False)}

    async def respond(request: Request, parsed: protocol.ParsedRequest, prompts, max_tokens: int, chat: bool):
        _check(engine, parsed, prompts, max_tokens, chat, queue_limit)
        opened = _Opened(engine, state.stats, parsed, prompts, max_tokens)
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        if parsed.stream:  # the engine requests are queued once the response starts: a client gone before, none
            events = _events(opened, parsed, rid, model_name, chat, token_text, state.cut)
            return StreamingResponse(events, media_type="text/event-stream")
        streams = opened.open()
        try:
            results = await _unless_cut_short(request, asyncio.gather(*(_collect(s) for s in streams)), state.cut)
        finally:
            opened.close()
        if results is None:
            return Response(status_code=499)  # nobody reads it
        choices = [(c.index, text, reason, protocol.logprobs_object(entries, token_text, chat))
                   for c, (text, _, reason, entries) in zip(parsed.choices, results)]
        use = protocol.usage(opened.prompt_tokens, sum(n for _, n, _, _ in results))
        return protocol.completion_response(rid, model_name, choices, use, chat)

    return app


class _Gate:
    """Plain ASGI middleware before every route: 503 while draining (all but /metrics), 401 without the API key
    (all but OPEN_PATHS), and the count of requests in flight."""

    def __init__(self, app, state: ServerState, api_key: str | None):
        self.app, self.state = app, state
        self.api_key = None if api_key is None else api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.state.draining and path != "/metrics":
            return await _error(503, "the server is shutting down", code="shutting_down")(scope, receive, send)
        if self.api_key is not None and path not in OPEN_PATHS and not self._authorized(scope):
            return await _error(401, "a missing or wrong API key: send Authorization: Bearer <the server's "
                                     "--api-key>", code="invalid_api_key")(scope, receive, send)
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, key = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.api_key)


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, protocol.error_type(status), param, code), status_code=status)


def _model_card(name: str, max_model_len: int) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "jaxinfer", "max_model_len": max_model_len}


async def _body(request: Request, model_name: str, max_bytes: int) -> dict:
    """The JSON object of a body of at most max_bytes (a 413 past it, told by Content-Length or while reading)."""
    length = request.headers.get("content-length", "")
    too_large = ProtocolError(None, f"the body is over this server's limit of {max_bytes} bytes", 413)
    if length.isdigit() and int(length) > max_bytes:
        raise too_large
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise too_large
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(None, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError(None, "the body must be a JSON object")
    name = body.get("model")
    if name is not None and name != model_name:
        raise ProtocolError("model", f"the model {name!r} does not exist (this server has {model_name!r})", 404,
                            "model_not_found")
    return body


def _prompt_ids(prompt, tokenizer, add_special_tokens: bool = True) -> list[int]:
    if isinstance(prompt, list):
        return prompt
    if tokenizer is None:
        raise ProtocolError("prompt", "this model has no tokenizer: give the prompt as token ids")
    return tokenizer.encode(prompt, add_special_tokens)


def _chat_ids(messages: list[dict], tokenizer, model_name: str, add_generation_prompt: bool = True) -> list[int]:
    if tokenizer is None or tokenizer.chat_template is None:
        raise ProtocolError("messages", f"the model {model_name!r} has no chat template; use /v1/completions")
    return tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)


def _check(engine: AsyncEngine, parsed: protocol.ParsedRequest, prompts, max_tokens: int, chat: bool,
           queue_limit: int) -> None:
    """Every choice checked before any is queued: a bad one is a 400 (a full queue a 429) and queues nothing."""
    prompt_param, context = "messages" if chat else "prompt", engine.engine.max_model_len
    for ids in prompts:  # the context named as the API's fields: the prompt alone, or what max_tokens adds to it
        if len(ids) >= context:
            raise ProtocolError(prompt_param, f"the prompt has {len(ids)} tokens; the context is {context}")
        if len(ids) + max_tokens > context:
            raise ProtocolError(parsed.max_tokens_param, f"{parsed.max_tokens_param}={max_tokens} and the prompt's "
                                f"{len(ids)} tokens exceed the context of {context} tokens")
    try:
        for ids in prompts:
            engine.engine.check_request(ids, parsed.sampling, max_tokens, parsed.stop)
    except ParameterError as e:  # the engine's names -> the API's
        names = {"max_new_tokens": parsed.max_tokens_param, "prompt": prompt_param}
        message = str(e).replace("max_new_tokens", parsed.max_tokens_param)
        raise ProtocolError(names.get(e.param, e.param), message) from None
    if engine.dead:
        raise ProtocolError(None, "the engine stopped", 503)
    if engine.num_unfinished + len(prompts) > queue_limit:
        raise ProtocolError(None, f"the server is at its limit of {queue_limit} requests (its slots and "
                            f"--max-waiting); retry later", 429, "rate_limit_exceeded")


class _Opened:
    """A checked request's engine streams, queued by open(): one per choice, each counted into the server's stats
    (prompt and generated tokens, finish reason, end-to-end latency); close() aborts what has not finished."""

    def __init__(self, engine: AsyncEngine, stats: metrics_lib.ServerStats, parsed, prompts, max_tokens: int):
        self.engine, self.stats, self.parsed, self.prompts, self.max_tokens = engine, stats, parsed, prompts, max_tokens
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.streams, self.finished = [], []

    def open(self) -> list:
        p = self.parsed
        self.streams = [self.engine.stream(ids, p.sampling, self.max_tokens, p.stop, c.seed, logprobs=p.logprobs)
                        for ids, c in zip(self.prompts, p.choices)]
        self.finished = [False] * len(self.streams)
        self.stats.prompt_tokens += self.prompt_tokens
        return [self._counted(i, s) for i, s in enumerate(self.streams)]

    async def _counted(self, i: int, stream):
        start = time.perf_counter()
        async for out in stream:
            self.stats.generation_tokens += len(out.new_token_ids)
            if out.finish_reason is not None:
                self.finished[i] = True
                self.stats.finished[out.finish_reason] += 1
                self.stats.e2e.observe(time.perf_counter() - start)
            yield out

    def close(self) -> None:
        """Abort every choice not finished (a client gone, an engine error), started or not. Synchronous: it runs
        in the `finally` of a cancelled response, where an await would be cancelled again."""
        for i, stream in enumerate(self.streams):
            stream.abort()
            if not self.finished[i]:
                self.finished[i] = True
                self.stats.finished["abort"] += 1


CUT_MESSAGE = "the server shut down before this request finished"


async def _unless_cut_short(request: Request, work, cut: asyncio.Event):
    """Await `work` -> its result; None once the client is gone, a 503 once the drain's time is up (the work
    cancelled either way, which aborts its requests)."""
    work = asyncio.ensure_future(work)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watches = {asyncio.ensure_future(disconnected()), asyncio.ensure_future(cut.wait())}
    try:
        await asyncio.wait({work, *watches}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for watch in watches:
            watch.cancel()
        abandoned = not work.done()
        if abandoned:  # (a cancelled gather reads as done with a CancelledError, not as cancelled)
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if abandoned:
        if cut.is_set():
            raise ProtocolError(None, CUT_MESSAGE, 503, "shutting_down")
        return None
    return work.result()


async def _collect(stream) -> tuple[str, int, str, list | None]:
    """-> (text, tokens, finish_reason, TokenLogprobs of each token or None) of one choice."""
    pieces, tokens, reason, logprobs = [], 0, None, None
    async for out in stream:
        pieces.append(out.text or "")
        tokens += len(out.new_token_ids)
        reason = out.finish_reason
        if out.logprobs is not None:
            logprobs = [] if logprobs is None else logprobs
            logprobs.extend(out.logprobs)
    return "".join(pieces), tokens, _finish(reason), logprobs


def _finish(reason: str | None) -> str:
    return "stop" if reason in (None, "stop", "abort") else reason


async def _events(opened: _Opened, parsed, rid, model_name, chat: bool, token_text, cut: asyncio.Event):
    """Server-sent events: each choice's pieces as they come, then (include_usage) the usage chunk, then [DONE].
    The engine stopping mid-stream, or the drain's time up (`cut`), is an error event (the status line has gone
    already) before [DONE]."""
    created = int(time.time())
    merged: asyncio.Queue = asyncio.Queue()

    def event(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        streams = opened.open()
    except EngineDeadError as e:
        yield event(protocol.error_body(str(e), "server_error"))
        yield "data: [DONE]\n\n"
        return

    async def pump(index: int, stream):
        try:
            async for out in stream:
                await merged.put((index, out))
        finally:
            merged.put_nowait((index, None))

    async def cut_short():
        await cut.wait()
        merged.put_nowait((None, None))

    tasks = [asyncio.create_task(pump(c.index, s)) for c, s in zip(parsed.choices, streams)]
    watch = asyncio.create_task(cut_short())
    try:
        if chat:
            for c in parsed.choices:
                yield event(protocol.stream_chunk(rid, model_name, created, c.index, None, None, chat, role=True))
        completion_tokens, open_choices = 0, len(tasks)
        text_offsets = dict.fromkeys((c.index for c in parsed.choices), 0)  # completions' logprobs.text_offset
        while open_choices:
            index, out = await merged.get()
            if index is None:
                yield event(protocol.error_body(CUT_MESSAGE, "server_error", code="shutting_down"))
                yield "data: [DONE]\n\n"
                return
            if out is None:
                open_choices -= 1
                continue
            completion_tokens += len(out.new_token_ids)
            reason = None if out.finish_reason is None else _finish(out.finish_reason)
            logprobs = protocol.logprobs_object(out.logprobs or None, token_text, chat, text_offsets[index])
            if logprobs is not None and not chat:
                text_offsets[index] += sum(len(t) for t in logprobs["tokens"])
            if out.text or reason is not None or logprobs is not None:
                yield event(protocol.stream_chunk(rid, model_name, created, index, out.text or "", reason, chat,
                                                  logprobs=logprobs))
        try:
            for t in tasks:
                await t  # re-raises a stream's error (the engine stopped)
        except EngineDeadError as e:
            yield event(protocol.error_body(str(e), "server_error"))
        else:
            if parsed.include_usage:
                use = protocol.usage(opened.prompt_tokens, completion_tokens)
                yield event(protocol.stream_chunk(rid, model_name, created, None, None, None, chat, use=use))
        yield "data: [DONE]\n\n"
    finally:
        for t in (*tasks, watch):  # a client gone, or done
            t.cancel()
        opened.close()  # aborts the requests not finished
