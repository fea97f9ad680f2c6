"""A chat's history kept inside the model's context: the oldest turns give way, the system message stays."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclasses.dataclass
class FittedPrompt:
    ids: list[int]  # the prompt: template over the kept history and the new message
    turns_dropped: int  # oldest (user, assistant) turns that no longer fit
    reply_tokens: int  # the reply budget: the one asked for, or what the context has left once nothing can go


class ChatHistory:
    """system message (optional) + completed (user, assistant) turns."""

    def __init__(self, system: str | None = None):
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[tuple[Message, Message]] = []

    def messages(self, user: str | None = None) -> list[Message]:
        return self._messages(self.turns, user)

    def _messages(self, turns, user: str | None) -> list[Message]:
        messages = list(self.system)
        for turn in turns:
            messages += turn
        return messages + ([{"role": "user", "content": user}] if user is not None else [])

    def add_turn(self, user: str, reply: str) -> None:
        self.turns.append(({"role": "user", "content": user}, {"role": "assistant", "content": reply}))

    def reset(self) -> None:
        self.turns.clear()

    def fit(
        self, user: str, encode: Callable[[list[Message]], list[int]], context: int, reply_tokens: int
    ) -> FittedPrompt:
        """The prompt for the next reply, dropping the oldest turns (for good) until prompt + reply fit context.

        encode: messages -> prompt ids (the chat template, then the tokenizer). When even the system message and
        `user` alone leave less than reply_tokens, the reply gets what is left; when nothing is left, ValueError.
        """
        for dropped in range(len(self.turns) + 1):
            ids = encode(self._messages(self.turns[dropped:], user))
            if len(ids) + reply_tokens <= context:
                break
        room = context - len(ids)
        if room < 1:  # nothing is dropped: the history stays for the next message
            raise ValueError(
                f"this message is {len(ids)} tokens with the chat template (system message included); the context "
                f"of {context} tokens leaves no room for a reply"
            )
        del self.turns[:dropped]
        return FittedPrompt(ids, dropped, min(reply_tokens, room))
