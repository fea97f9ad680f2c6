"""ChatHistory.fit: which turns give way to the context, exactly (no model: one token per word)."""

from __future__ import annotations

import pytest

from jaxinfer.chat_history import ChatHistory


def words(messages) -> list[int]:
    """A stand-in template: one token per word of every message, plus one per message for its header."""
    return [0 for m in messages for _ in range(1 + len(m["content"].split()))]


def history_of(turns: int, system: str | None = "be brief") -> ChatHistory:
    history = ChatHistory(system)
    for i in range(turns):
        history.add_turn(f"question {i}", f"answer {i} here")
    return history


def test_everything_fits_nothing_dropped():
    history = history_of(3)
    fitted = history.fit("next one", words, context=100, reply_tokens=10)
    assert (fitted.turns_dropped, fitted.reply_tokens, len(fitted.ids)) == (0, 10, 3 + 3 * 7 + 3)


def test_oldest_turns_go_first_and_the_system_message_stays():
    history = history_of(5)  # system 3 tokens, each turn 3 + 4 = 7, the new message 3
    fitted = history.fit("next one", words, context=3 + 2 * 7 + 3 + 10, reply_tokens=10)
    assert fitted.turns_dropped == 3
    assert [m["content"] for m in history.messages()] == ["be brief", "question 3", "answer 3 here", "question 4",
                                                          "answer 4 here"]
    assert len(fitted.ids) == 3 + 2 * 7 + 3


def test_a_long_message_gets_the_room_that_is_left():
    history = history_of(2)
    fitted = history.fit("a b c d e f g h", words, context=15, reply_tokens=10)
    assert (fitted.turns_dropped, len(fitted.ids), fitted.reply_tokens) == (2, 3 + 9, 3)


def test_a_message_with_no_room_is_refused_and_the_history_kept():
    history = history_of(2)
    with pytest.raises(ValueError, match="12 tokens .* context of 12 tokens leaves no room"):
        history.fit("a b c d e f g h", words, context=12, reply_tokens=10)
    assert len(history.turns) == 2


def test_reset_keeps_the_system_message():
    history = history_of(4)
    history.reset()
    assert history.messages("hi") == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert ChatHistory(None).messages("hi") == [{"role": "user", "content": "hi"}]
