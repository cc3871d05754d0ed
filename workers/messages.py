"""The unified chat request and completion every wire format maps to and from."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from workers.errors import InputError

ROLES = ("system", "user", "assistant")
#: Largest prompt accepted, in characters (about 1M tokens): beyond every model's context.
MAX_PROMPT_CHARS = 4_000_000
MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    max_tokens: int
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    json_mode: bool = False

    def system_text(self) -> str:
        return "\n\n".join(m.content for m in self.messages if m.role == "system")

    def turns(self) -> list[Message]:
        return [m for m in self.messages if m.role != "system"]

    def estimated_input_tokens(self) -> int:
        return estimate_tokens(m.content for m in self.messages) + 3 * len(self.messages)

    def to_json(self) -> dict[str, Any]:
        return {
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stop": list(self.stop),
            "json_mode": self.json_mode,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ChatRequest:
        return cls(
            messages=tuple(Message(m["role"], m["content"]) for m in data["messages"]),
            max_tokens=data["max_tokens"],
            temperature=data.get("temperature"),
            stop=tuple(data.get("stop") or ()),
            json_mode=bool(data.get("json_mode")),
        )


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # stop | length | tool_calls | content_filter | error | other
    input_tokens: int
    output_tokens: int
    signal: Any = field(default=None, repr=False, compare=False)  # RateLimitSignal


def estimate_tokens(texts: Iterable[str]) -> int:
    """About four characters per token: the estimate admission reserves before the call."""
    return sum(math.ceil(len(t) / 4) for t in texts)


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{what}: expected a string, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_CHARS:
        raise InputError(f"{what}: too long ({len(value):,} characters, at most {MAX_PROMPT_CHARS:,})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{what}: not valid UTF-8 (at character {exc.start})") from None
    return value


def build_request(
    prompt: object = None,
    *,
    messages: object = None,
    system: object = None,
    max_tokens: object = None,
    temperature: object = None,
    stop: object = None,
    json_mode: object = False,
    default_max_tokens: int = 512,
) -> ChatRequest:
    """Validate what a caller handed in and build the request; errors name the field."""
    if (prompt is None) == (messages is None):
        raise InputError("give either prompt or messages (exactly one)")
    built: list[Message] = []
    if system is not None:
        built.append(Message("system", _text(system, "system")))
    if prompt is not None:
        text = _text(prompt, "prompt")
        if not text.strip():
            raise InputError("prompt: is empty")
        built.append(Message("user", text))
    else:
        if not isinstance(messages, list | tuple) or not messages:
            raise InputError("messages: expected a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or set(m) - {"role", "content", "name"}:
                raise InputError(f"messages[{i}]: expected an object with role and content")
            role = m.get("role")
            if role not in ROLES:
                raise InputError(f"messages[{i}].role: expected one of {', '.join(ROLES)}, got {role!r}")
            built.append(Message(role, _text(m.get("content"), f"messages[{i}].content")))
        if not any(m.role == "user" and m.content.strip() for m in built):
            raise InputError("messages: needs at least one non-empty user message")
    if max_tokens is None:
        max_tokens = default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InputError(f"max_tokens: expected a positive integer, got {max_tokens!r}")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2
    ):
        raise InputError(f"temperature: expected a number between 0 and 2, got {temperature!r}")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
        raise InputError("stop: expected a string or a list of non-empty strings")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InputError(f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}")
    if not isinstance(json_mode, bool):
        raise InputError(f"json_mode: expected true or false, got {json_mode!r}")
    return ChatRequest(
        messages=tuple(built),
        max_tokens=max_tokens,
        temperature=None if temperature is None else float(temperature),
        stop=tuple(stop),
        json_mode=json_mode,
    )
