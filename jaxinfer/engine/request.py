"""One request's state on the host: a dataclass with an enum status.

vLLM v1's formulation: a request is `num_computed_tokens` (tokens whose K/V are in the cache) catching up with
`num_tokens` (prompt + output so far). A prefill chunk, a decode step, a prefix-cache hit and a recompute after
preemption are all "compute the next n tokens"; when the computed tokens reach `num_tokens`, the step samples the
next output token.
"""

from __future__ import annotations

import dataclasses
import enum

from jaxinfer.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, its pages freed; recomputed when admitted again
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_new_tokens
    ABORT = "abort"


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """One output token's log-probability and its most likely alternatives, from log_softmax of the raw logits
    (before temperature, penalties and top-k/top-p/min-p: what vLLM and OpenAI report)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token_id, logprob), most likely first: as many as the request asked


@dataclasses.dataclass(eq=False)
class Request:
    request_id: int  # assigned by the engine, in arrival order
    prompt_token_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    seed: int = 0
    priority: int = 0  # lower runs first; FCFS among equals
    stop_token_ids: frozenset[int] = frozenset()  # the model's EOS ids and the sampling's stop ids
    stop: tuple[str, ...] = ()  # stop strings, matched on the host's detokenized text
    logprobs: int | None = None  # top alternatives to report with each output token's logprob; None: no logprobs

    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    slot: int | None = None  # the device row it runs in while RUNNING
    pages: list[int] = dataclasses.field(default_factory=list)  # page of each page_size positions, in order
    page_hashes: list[bytes] = dataclasses.field(default_factory=list)  # hash chain over its full pages of tokens
    num_registered_pages: int = 0  # leading full pages already offered to the prefix cache
    num_cached_tokens: int = 0  # prefix-cache hit at its latest admission
    num_preemptions: int = 0
    admitted_order: int = -1  # the scheduler's admission counter at its latest admission

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """all tokens (prompt then output)[start:stop]."""
        prompt = self.prompt_token_ids
        if stop <= len(prompt):
            return prompt[start:stop]
        out = self.output_token_ids
        return prompt[start:] + out[max(0, start - len(prompt)) : stop - len(prompt)]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
