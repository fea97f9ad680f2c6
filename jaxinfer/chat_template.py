"""Chat templates: the Jinja program a model ships to turn a list of messages into one prompt string.

Rendered the way transformers' `apply_chat_template` renders them, so a prompt built here tokenizes to the ids
the model was trained on: a sandboxed environment (templates come from model repos: untrusted code),
trim_blocks/lstrip_blocks, loop controls, and the helpers templates call (`raise_exception`, `strftime_now`,
a `tojson` that does not HTML-escape, `{% generation %}` blocks).
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np


def render_chat_template(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **kwargs,
) -> str:
    """The prompt `template` makes of `messages` (dicts with at least "role" and "content").

    add_generation_prompt: end with the header that opens the assistant's turn.
    tools, documents: JSON-schema dicts and {"title", "text"} dicts, for templates that show them.
    kwargs: further variables the template reads (e.g. `enable_thinking`, `unk_token`).
    Errors a template raises on purpose (`raise_exception`) come out as jinja2.TemplateError.
    """
    if not isinstance(template, str) or not template:
        raise ValueError(f"chat template must be a non-empty string, got {template!r}")
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict, got {message!r}")
        # APIs send `content=None` or `tool_calls=None`; templates handle a missing key but often print "None".
        chat.append({key: _plain(value) for key, value in message.items() if value is not None})
    if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
        raise ValueError("tools must be JSON-schema dicts")
    if documents is not None and not all(isinstance(document, Mapping) for document in documents):
        raise ValueError("documents must be dicts with 'title' and 'text' keys")
    return _compile(template).render(
        messages=chat,
        tools=_plain(tools),
        documents=_plain(documents),
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        **_plain(kwargs),
    )


def _plain(value: Any) -> Any:
    """A copy made of JSON types only: the sandbox cannot vet the methods of arbitrary objects, and the
    caller's messages must not change when a template mutates what it is given."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, np.generic):
        # np.bool_(False) would otherwise become a truthy placeholder string.
        return _plain(value.item())
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return f"<{type(value).__name__}>"


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for training masks; here it only
    renders its body, so templates that use it still parse."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` without underscore names, which would reach Python internals from inside the sandbox."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_namespace_name(name):
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a chat template may not set the namespace attribute {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML, which changes the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _Dict()
    return env.from_string(template)


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` in templates, without handing them the `dict` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)
