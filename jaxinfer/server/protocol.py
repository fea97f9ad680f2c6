"""The OpenAI API's request bodies -> checked engine requests, and the engine's outputs -> its response objects.

Plain Python over the decoded JSON (no web framework here): every bad value is a ProtocolError naming the field as
the API does (`max_tokens`, `messages[1].content`), which the app turns into a 400 in OpenAI's error shape. Fields the
API has and this server does not implement yet (`echo`, `tools`, ...) are refused by name, never ignored.
Unknown fields are ignored, as OpenAI and vLLM do.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import secrets
import time

from jaxinfer.engine.engine import MAX_LOGPROBS
from jaxinfer.errors import is_int
from jaxinfer.sampling_params import INT32_MAX, SEED_LIMIT, SamplingParams

MAX_N = 16  # choices per prompt
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the completions API's documented default
NOT_IMPLEMENTED = ("echo", "best_of", "suffix", "logit_bias", "tools", "functions",
                   "response_format", "presence_penalty", "frequency_penalty")


class ProtocolError(ValueError):
    """A bad request body: `param` is the field as the API names it; `status` the HTTP status to answer with."""

    def __init__(self, param: str | None, message: str, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.message, self.status, self.code = param, message, status, code


@dataclasses.dataclass(frozen=True)
class Choice:
    """One engine request of an API request: `index` its place among the response's choices."""

    index: int
    prompt: str | list[int]
    seed: int


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    choices: tuple[Choice, ...]
    sampling: SamplingParams
    max_tokens: int | None  # None: up to the context (chat's default)
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    max_tokens_param: str  # the field a bad max_tokens is reported under
    logprobs: int | None  # top alternatives reported with each token's logprob; None: no logprobs


def _get(body: dict, name: str, kind, default=None, *, what: str):
    """body[name] if it is a `kind` (a JSON boolean only where kind is bool), default if absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise ProtocolError(name, f"{name} must be {what}, not {_json_type(value)}")
    return value


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _number(body: dict, name: str, default: float, lo: float, hi: float, *, lo_open=False) -> float:
    value = _get(body, name, numbers.Real, default, what="a number")
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        bounds = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ProtocolError(name, f"{name}={value!r} must be in {bounds}")
    return float(value)


def _integer(body: dict, name: str, default, lo: int, hi: int):
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value):
        raise ProtocolError(name, f"{name} must be an integer, not {_json_type(value)}")
    if not lo <= value <= hi:
        raise ProtocolError(name, f"{name}={value} must be in [{lo}, {hi}]")
    return int(value)


def _check_not_implemented(body: dict) -> None:
    for name in NOT_IMPLEMENTED:
        if body.get(name) not in (None, False, 0, [], {}):
            raise ProtocolError(name, f"{name} is not supported by this server yet")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ProtocolError("stop", "stop must be a string or an array of strings")
    if len(stop) > 4 or any(s == "" for s in stop):
        raise ProtocolError("stop", "stop takes up to 4 non-empty strings")
    return tuple(stop)


def _sampling(body: dict) -> SamplingParams:
    return SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=max(_integer(body, "top_k", 0, -1, INT32_MAX), 0),  # -1 or 0: off (vLLM's -1, our 0)
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 100.0, lo_open=True),
        ignore_eos=_get(body, "ignore_eos", bool, False, what="a boolean"),  # vLLM's extension
    )


def _logprobs(body: dict, chat: bool) -> int | None:
    """completions: logprobs = n (alternatives per token); chat: logprobs = true, with top_logprobs = n."""
    if not chat:
        return _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    wanted = _get(body, "logprobs", bool, False, what="a boolean")
    top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not wanted:
        raise ProtocolError("top_logprobs", "top_logprobs needs logprobs: true")
    return (top or 0) if wanted else None


def _common(body: dict, prompts: list, max_tokens_default: int | None, chat: bool) -> ParsedRequest:
    _check_not_implemented(body)
    sampling = _sampling(body)
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, param, max_tokens_default, 1, INT32_MAX)
    n = _integer(body, "n", 1, 1, MAX_N)
    seed = _integer(body, "seed", None, 0, SEED_LIMIT - 1)
    stream = _get(body, "stream", bool, False, what="a boolean")
    options = _get(body, "stream_options", dict, {}, what="an object")
    if options and not stream:
        raise ProtocolError("stream_options", "stream_options needs stream: true")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ProtocolError("stream_options.include_usage", "stream_options.include_usage must be a boolean")
    base = secrets.randbits(63) if seed is None else seed
    choices = tuple(Choice(p * n + j, prompt, (base + j) % SEED_LIMIT)
                    for p, prompt in enumerate(prompts) for j in range(n))
    return ParsedRequest(choices, sampling, max_tokens, _stop(body), stream, include_usage, param,
                         _logprobs(body, chat))


def parse_completion(body: dict) -> ParsedRequest:
    """POST /v1/completions: prompt a string, an array of strings, an array of token ids or an array of those."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
        for i, p in enumerate(prompts):
            if isinstance(p, list) and not all(is_int(t) for t in p):
                raise ProtocolError("prompt", f"prompt[{i}] must be an array of token ids (integers)")
    else:
        raise ProtocolError("prompt", "prompt must be a non-empty string, array of strings, array of token ids or "
                                      "array of such arrays")
    for i, p in enumerate(prompts):  # token ids in the vocabulary: the engine's own check (a 400 naming prompt)
        if len(p) == 0:
            raise ProtocolError("prompt", f"prompt[{i}] is empty" if len(prompts) > 1 else "prompt is empty")
    return _common(body, prompts, COMPLETIONS_DEFAULT_MAX_TOKENS, chat=False)


def parse_chat(body: dict) -> tuple[ParsedRequest, list[dict]]:
    """POST /v1/chat/completions -> (the request with its prompt left to the chat template, the messages)."""
    return _common(body, [""], None, chat=True), _messages(body)


def _messages(body: dict) -> list[dict]:
    """body["messages"] -> [{role, content}] with text content, developer messages as system ones."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("messages", "messages must be a non-empty array of {role, content} objects")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ProtocolError(f"messages[{i}]", f"messages[{i}] must be an object")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "developer", "user", "assistant"):
            raise ProtocolError(f"messages[{i}].role", f"messages[{i}].role={role!r} must be system, developer, "
                                                       "user or assistant")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ProtocolError(f"messages[{i}].content", "only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ProtocolError(f"messages[{i}].content", f"messages[{i}].content must be a string")
        checked.append({"role": "system" if role == "developer" else role, "content": content})
    return checked


def parse_tokenize(body: dict) -> tuple[str | None, list[dict] | None, bool, bool]:
    """POST /tokenize (vLLM's): {"prompt": str} or {"messages": [...]} -> (prompt, messages, add_special_tokens,
    add_generation_prompt); exactly one of the first two is given."""
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt == has_messages:
        raise ProtocolError("prompt", "give either prompt (a string) or messages")
    add_generation_prompt = _get(body, "add_generation_prompt", bool, True, what="a boolean")
    if has_messages:  # the template writes the special tokens
        return None, _messages(body), False, add_generation_prompt
    prompt = _get(body, "prompt", str, what="a string")
    return prompt, None, _get(body, "add_special_tokens", bool, True, what="a boolean"), add_generation_prompt


def parse_detokenize(body: dict, vocab_size: int) -> list[int]:
    """POST /detokenize (vLLM's): {"tokens": [ids]} -> the ids, each in [0, vocab_size)."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(is_int(t) for t in tokens):
        raise ProtocolError("tokens", "tokens must be an array of token ids (integers)")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ProtocolError("tokens", f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return [int(t) for t in tokens]


# ---------------------------------------------------------------------------------------------
# Responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_object(entries, token_text, chat: bool, text_offset: int = 0) -> dict | None:
    """A choice's (or a stream chunk's) `logprobs` in its endpoint's format, from TokenLogprobs entries (None: not
    asked). token_text(id) -> the token's text. Chat: {"content": [{token, logprob, bytes, top_logprobs}]};
    completions: {tokens, token_logprobs, top_logprobs (the alternatives and the token, by text), text_offset}."""
    if entries is None:
        return None
    if chat:
        def item(token_id, logprob):
            text = token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}
    tokens = [token_text(e.token_id) for e in entries]
    offsets = list(itertools.accumulate(map(len, tokens), initial=text_offset))[:-1]  # where each token starts
    top = [{**{token_text(t): lp for t, lp in e.top}, tokens[i]: e.logprob} for i, e in enumerate(entries)]
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
            "text_offset": offsets}


def completion_response(rid: str, model: str, choices: list[tuple[int, str, str, dict | None]], use: dict,
                        chat: bool) -> dict:
    """choices: (index, text, finish_reason, logprobs object) -> a whole (non-streamed) response."""
    if chat:
        items = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                  "finish_reason": reason} for i, text, reason, lp in choices]
    else:
        items = [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}
                 for i, text, reason, lp in choices]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": items, "usage": use}


def stream_chunk(rid: str, model: str, created: int, index: int | None, text: str | None, reason: str | None,
                 chat: bool, role: bool = False, use: dict | None = None, logprobs: dict | None = None) -> dict:
    """One server-sent event's object: a piece of choice `index`'s text (and its tokens' logprobs object), or
    (index None) the usage chunk."""
    if index is None:
        items = []
    elif chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        items = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]
    else:
        items = [{"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}]
    chunk = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
             "model": model, "choices": items}
    if use is not None or index is None:
        chunk["usage"] = use
    return chunk


def error_type(status: int) -> str:
    """The OpenAI error `type` of an HTTP status."""
    return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
