"""ParameterError: a bad value for one named parameter of the public API.

Front ends name the parameter in their own words: the CLI as its flag (`--top-p`), the server (later) as OpenAI's
`param`. `param` is the API's name (`top_p`, `prompts`), `index` the element of a list parameter, if any.
"""

from __future__ import annotations

import numbers

_NO_VALUE = object()


class ParameterError(ValueError):
    def __init__(self, param: str, reason: str, *, value=_NO_VALUE, index: int | None = None):
        self.param, self.reason, self.value, self.index = param, reason, value, index
        name = param if index is None else f"{param}[{index}]"
        super().__init__(f"{name} {reason}" if value is _NO_VALUE else f"{name}={value!r} {reason}")

    @property
    def has_value(self) -> bool:
        return self.value is not _NO_VALUE


def is_int(x) -> bool:
    """A Python or numpy integer, not a bool (True is an int to Python, and JSON's true becomes one; as a token id,
    a count or a config field it is a mistake)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)
