"""What the command line asks to generate: PromptSpecs from --prompt or a prompt file, checked before any load.

A prompt file holds one prompt per line, or JSON lines (`.jsonl`) whose fields override the command's flags:

    {"prompt": "Tell me a joke.", "chat": true, "temperature": 0.7, "seed": 3, "max_new_tokens": 64, "id": "a"}
    {"prompt_ids": [1, 2, 3], "top_k": 40}

Plain Python, no jax: a bad line fails in milliseconds, naming the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxinfer.errors import ParameterError, is_int
from jaxinfer.sampling_params import INT32_MAX, SamplingParams, check_seed

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
JSONL_FIELDS = ("prompt", "prompt_ids", "chat", "system", "max_new_tokens", "seed", "id", *SAMPLING_FIELDS)


class PromptError(ValueError):
    """A bad prompt or prompt-file line; the message names where (`--prompt`, `prompts.jsonl line 3`)."""


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    where: str  # for messages: "--prompt", "prompts.txt line 3"
    text: str | None  # exactly one of text and ids
    ids: tuple[int, ...] | None
    chat: bool
    system: str | None
    sampling: SamplingParams
    max_new_tokens: int
    seed: int
    id: str | int | None = None  # echoed in --json output


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The command's flags, for fields a line does not set."""

    chat: bool
    system: str | None
    max_new_tokens: int
    seed: int
    sampling: dict  # SAMPLING_FIELDS -> value


def utf8_problem(text: str) -> str | None:
    """None if text is valid UTF-8 text; else where it is not. argv and our stdin decode with surrogateescape,
    so undecodable bytes arrive as lone surrogates (JSON's \\ud800 escapes make them too)."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        raw = text[e.start].encode("utf-8", "surrogateescape") if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else None
        what = f"byte 0x{raw[0]:02x}" if raw else f"lone surrogate U+{ord(text[e.start]):04X}"
        return f"is not valid UTF-8 ({what} at character {e.start})"


def check_text(text: str, where: str) -> str:
    problem = utf8_problem(text)
    if problem:
        raise PromptError(f"{where} {problem}")
    return text


def make_spec(where: str, fields: dict, defaults: Defaults) -> PromptSpec:
    """One prompt from its fields (a JSON line, or the flags' own), every value checked."""
    unknown = sorted(set(fields) - set(JSONL_FIELDS))
    if unknown:
        raise PromptError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(JSONL_FIELDS)})")
    if ("prompt" in fields) == ("prompt_ids" in fields):
        raise PromptError(f"{where}: give exactly one of 'prompt' (text) and 'prompt_ids' (token ids)")
    text, ids = fields.get("prompt"), fields.get("prompt_ids")
    if text is not None:
        if not isinstance(text, str) or not text:
            raise PromptError(f"{where}: 'prompt' must be a non-empty string, got {text!r:.60}")
        check_text(text, f"{where}: 'prompt'")
    else:
        if not isinstance(ids, (list, tuple)) or not ids or not all(is_int(t) and t >= 0 for t in ids):
            raise PromptError(f"{where}: 'prompt_ids' must be a non-empty list of token ids (ints >= 0), got {ids!r:.60}")
        ids = tuple(int(t) for t in ids)
    chat = fields.get("chat", defaults.chat)
    if not isinstance(chat, bool):
        raise PromptError(f"{where}: 'chat' must be true or false, got {chat!r}")
    system = fields.get("system", defaults.system)
    if system is not None:
        if not isinstance(system, str):
            raise PromptError(f"{where}: 'system' must be a string, got {system!r:.60}")
        check_text(system, f"{where}: 'system'")
    max_new_tokens = fields.get("max_new_tokens", defaults.max_new_tokens)
    if not (is_int(max_new_tokens) and 1 <= max_new_tokens <= INT32_MAX):
        raise PromptError(f"{where}: 'max_new_tokens' must be an int in [1, {INT32_MAX}], got {max_new_tokens!r}")
    item_id = fields.get("id")
    if item_id is not None and not (isinstance(item_id, str) or is_int(item_id)):
        raise PromptError(f"{where}: 'id' must be a string or an int, got {item_id!r:.60}")
    try:
        seed = check_seed(fields.get("seed", defaults.seed))
        sampling = SamplingParams(**{name: fields.get(name, defaults.sampling[name]) for name in SAMPLING_FIELDS})
    except ParameterError as e:
        raise PromptError(f"{where}: {e}") from None
    return PromptSpec(where, text, ids, chat, system, sampling, int(max_new_tokens), seed, item_id)


def read_prompt_file(path: str, jsonl: bool | None, defaults: Defaults, stdin=None) -> list[PromptSpec]:
    """Every prompt of a file ("-": stdin), all checked before any is run. jsonl None: by the file's suffix."""
    name = "stdin" if path == "-" else path
    if path == "-":
        data = stdin.buffer.read() if stdin is not None else b""
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise PromptError(f"cannot read the prompt file {path}: {e.strerror or e}") from None
    if jsonl is None:
        jsonl = Path(path).suffix in (".jsonl", ".ndjson")
    specs = []
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"{name} line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PromptError(f"{where} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start})") from None
        if not line.strip():
            continue
        if not jsonl:
            specs.append(make_spec(where, {"prompt": line}, defaults))
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{where} is not JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(fields, dict):
            raise PromptError(f"{where} must be a JSON object, got {type(fields).__name__}")
        specs.append(make_spec(where, fields, defaults))
    if not specs:
        raise PromptError(f"the prompt file {name} holds no prompt")
    return specs

