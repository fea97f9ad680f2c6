"""SamplingParams: one request's sampling settings, plain Python (no jax), so the CLI, the engine and the server
validate a request before anything is loaded or traced. The device side is jaxinfer.sampling."""

from __future__ import annotations

import dataclasses
import math
import numbers

from jaxinfer.errors import ParameterError

INT32_MAX = 2**31 - 1  # top_k and token ids travel to the device as int32
SEED_LIMIT = 2**64  # seeds are 64-bit, as in the OpenAI API and vLLM


def check_seed(seed) -> int:
    """seed as an int in [0, 2**64); a float, a bool or anything outside is a ParameterError naming it."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ParameterError("seed", "must be an int", value=seed)
    if not 0 <= seed < SEED_LIMIT:
        raise ParameterError("seed", "must be in [0, 2**64)", value=seed)
    return int(seed)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Defaults follow vLLM and the OpenAI API (temperature 1); `SamplingParams(temperature=0.0)` is greedy."""

    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off; larger than the vocabulary = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # decode past the model's EOS ids (vLLM's; benchmarks run outputs their full length)

    def __post_init__(self):
        # Normalize to plain Python scalars so equal settings hash and compare equal (np.float32(0.5) == 0.5 etc.).
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ParameterError(name, "must be a real number", value=value)
            object.__setattr__(self, name, float(value))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise ParameterError("top_k", "must be an int", value=self.top_k)
        object.__setattr__(self, "top_k", int(self.top_k))

        # `not (x >= 0)` rather than `x < 0` so NaN is rejected too.
        if not (0.0 <= self.temperature < math.inf):
            raise ParameterError("temperature", "must be >= 0 and finite", value=self.temperature)
        if not (0 <= self.top_k <= INT32_MAX):
            raise ParameterError("top_k", f"must be in [0, {INT32_MAX}] (0 disables top-k)", value=self.top_k)
        if not (0.0 < self.top_p <= 1.0):
            raise ParameterError("top_p", "must be in (0, 1]", value=self.top_p)
        if not (0.0 <= self.min_p <= 1.0):
            raise ParameterError("min_p", "must be in [0, 1]", value=self.min_p)
        if not (0.0 < self.repetition_penalty < math.inf):
            raise ParameterError("repetition_penalty", "must be > 0 and finite", value=self.repetition_penalty)

        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, (tuple, list)):
            raise ParameterError("stop_token_ids", "must be a list of token ids", value=self.stop_token_ids)
        stop_token_ids = tuple(self.stop_token_ids)
        for token_id in stop_token_ids:
            if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral) or not 0 <= token_id <= INT32_MAX:
                raise ParameterError(
                    "stop_token_ids", f"must be non-negative int32 token ids (bad: {token_id!r})", value=stop_token_ids
                )
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stop_token_ids))
        if not isinstance(self.ignore_eos, bool):
            raise ParameterError("ignore_eos", "must be True or False", value=self.ignore_eos)

    def stop_ids(self, eos_token_ids) -> frozenset[int]:
        """The token ids that end this request: the model's EOS ids (unless ignore_eos) and stop_token_ids."""
        return frozenset(self.stop_token_ids) | frozenset(() if self.ignore_eos else eos_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
