"""The OpenAI-compatible HTTP app (FastAPI) on an AsyncEngine: routes, errors in OpenAI's shape, server-sent events.

    app = create_app(async_engine, model_name="smollm2")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every request's prompt is tokenized here (so `usage` counts what the engine computes), then each of its choices is
one engine request; a stream interleaves the choices' tokens as they come. A client gone mid-stream cancels the
response's task, which aborts its engine requests (AsyncEngine's streams abort when closed early). A bad body is a
400 naming the field; nothing about it reaches the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from jaxinfer.engine.async_engine import AsyncEngine, EngineDeadError
from jaxinfer.errors import ParameterError
from jaxinfer.server import protocol
from jaxinfer.server.protocol import ProtocolError



def create_app(engine: AsyncEngine, model_name: str) -> FastAPI:
    app = FastAPI(title="jaxinfer", docs_url=None, redoc_url=None)
    tokenizer = engine.engine.tokenizer
    max_model_len = engine.engine.max_model_len

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, e: ProtocolError):
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        return JSONResponse(protocol.error_body(e.message, kind, e.param, e.code), status_code=e.status)

    @app.exception_handler(ParameterError)
    async def _parameter_error(request: Request, e: ParameterError):  # a check below the protocol's own
        return JSONResponse(protocol.error_body(str(e), "invalid_request_error", e.param), status_code=400)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, e: EngineDeadError):
        return JSONResponse(protocol.error_body(str(e), "server_error"), status_code=503)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(protocol.error_body(str(e.detail), kind), status_code=e.status_code)

    @app.get("/health")
    async def health():
        if engine.dead:
            return JSONResponse(protocol.error_body("the engine stopped", "server_error"), status_code=503)
        return {"status": "ok"}

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
        body = await _body(request, model_name)
        parsed = protocol.parse_completion(body)
        prompts = [_prompt_ids(c.prompt, tokenizer) for c in parsed.choices]
        return await _respond(engine, parsed, prompts, parsed.max_tokens, model_name, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _body(request, model_name)
        parsed, messages = protocol.parse_chat(body)
        if tokenizer is None or tokenizer.chat_template is None:
            raise ProtocolError("messages", f"the model {model_name!r} has no chat template; use /v1/completions")
        ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
        max_tokens = parsed.max_tokens if parsed.max_tokens is not None else max(max_model_len - len(ids), 1)
        return await _respond(engine, parsed, [ids] * len(parsed.choices), max_tokens, model_name, chat=True)

    return app


def _model_card(name: str, max_model_len: int) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "jaxinfer", "max_model_len": max_model_len}


async def _body(request: Request, model_name: str) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(None, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError(None, "the body must be a JSON object")
    name = body.get("model")
    if name is not None and name != model_name:
        raise ProtocolError("model", f"the model {name!r} does not exist (this server has {model_name!r})", 404,
                            "model_not_found")
    return body


def _prompt_ids(prompt, tokenizer) -> list[int]:
    if isinstance(prompt, list):
        return prompt
    if tokenizer is None:
        raise ProtocolError("prompt", "this model has no tokenizer: give the prompt as token ids")
    return tokenizer.encode(prompt)


def _open_streams(engine: AsyncEngine, parsed: protocol.ParsedRequest, prompts, max_tokens: int, chat: bool):
    """One engine stream per choice, all checked before any is queued: a bad one is a 400 and queues nothing."""
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
        return [engine.stream(ids, parsed.sampling, max_tokens, parsed.stop, c.seed)
                for ids, c in zip(prompts, parsed.choices)]
    except ParameterError as e:  # the engine's names -> the API's
        names = {"max_new_tokens": parsed.max_tokens_param, "prompt": prompt_param}
        message = str(e).replace("max_new_tokens", parsed.max_tokens_param)
        raise ProtocolError(names.get(e.param, e.param), message) from None
    except EngineDeadError as e:
        raise ProtocolError(None, str(e), 503) from None


async def _respond(engine, parsed, prompts, max_tokens, model_name, chat: bool):
    streams = _open_streams(engine, parsed, prompts, max_tokens, chat)
    prompt_tokens = sum(len(p) for p in prompts)
    rid = protocol.new_id("chatcmpl" if chat else "cmpl")
    if parsed.stream:
        events = _events(streams, parsed, rid, model_name, prompt_tokens, chat)
        return StreamingResponse(events, media_type="text/event-stream")
    results = await asyncio.gather(*(_collect(s) for s in streams))
    choices = [(c.index, text, reason) for c, (text, _, reason) in zip(parsed.choices, results)]
    use = protocol.usage(prompt_tokens, sum(n for _, n, _ in results))
    return protocol.completion_response(rid, model_name, choices, use, chat)


async def _collect(stream) -> tuple[str, int, str]:
    """-> (text, tokens, finish_reason) of one choice."""
    pieces, tokens, reason = [], 0, None
    async with contextlib.aclosing(stream):
        async for out in stream:
            pieces.append(out.text or "")
            tokens += len(out.new_token_ids)
            reason = out.finish_reason
    return "".join(pieces), tokens, _finish(reason)


def _finish(reason: str | None) -> str:
    return "stop" if reason in (None, "stop", "abort") else reason


async def _events(streams, parsed, rid, model_name, prompt_tokens, chat: bool):
    """Server-sent events: each choice's pieces as they come, then (include_usage) the usage chunk, then [DONE]."""
    created = int(time.time())
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream):
        async with contextlib.aclosing(stream):
            async for out in stream:
                await merged.put((index, out))
        await merged.put((index, None))

    def event(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    tasks = [asyncio.create_task(pump(c.index, s)) for c, s in zip(parsed.choices, streams)]
    try:
        if chat:
            for c in parsed.choices:
                yield event(protocol.stream_chunk(rid, model_name, created, c.index, None, None, chat, role=True))
        completion_tokens, open_choices = 0, len(tasks)
        while open_choices:
            index, out = await merged.get()
            if out is None:
                open_choices -= 1
                continue
            completion_tokens += len(out.new_token_ids)
            reason = None if out.finish_reason is None else _finish(out.finish_reason)
            if out.text or reason is not None:
                yield event(protocol.stream_chunk(rid, model_name, created, index, out.text or "", reason, chat))
        for t in tasks:
            await t  # re-raises a stream's error (the engine stopped)
        if parsed.include_usage:
            use = protocol.usage(prompt_tokens, completion_tokens)
            yield event(protocol.stream_chunk(rid, model_name, created, None, None, None, chat, use=use))
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:  # a client gone: cancelling each pump closes its stream, which aborts the request
            t.cancel()
