"""Batch input: JSONL lines read one at a time, each checked completely before anything runs.

A line is ``{"custom_id": "...", "prompt": "..."}`` (or ``"messages"``), optionally with
``system``, ``max_tokens``, ``temperature``, ``stop``, ``json_mode``, ``task`` and ``tier``;
or the OpenAI Batch API line ``{"custom_id", "method": "POST", "url": "/v1/chat/completions",
"body": {...}}``. Every problem is reported as ``line N: what is wrong``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer.jobs import check_text, prepare
from workers.errors import InputError
from workers.messages import ChatRequest
from workers.runtime import Runtime

ITEM_KEYS = {
    "custom_id",
    "prompt",
    "messages",
    "system",
    "max_tokens",
    "temperature",
    "stop",
    "json_mode",
    "task",
    "tier",
}
OPENAI_LINE_KEYS = {"custom_id", "method", "url", "body"}
OPENAI_BODY_KEYS = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "stop",
    "response_format",
    "user",
}
OPENAI_URL = "/v1/chat/completions"
MAX_CUSTOM_ID = 512
MAX_LINE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class BatchItem:
    line: int  # 1-based line number (or position in the item list)
    custom_id: str
    task: str
    tier: str
    request: ChatRequest
    preferred_provider: str | None = None  # from an OpenAI line's body.model


@dataclass(frozen=True)
class BadLine:
    line: int
    custom_id: str | None
    error: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.error}"


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value or BadLine) for each non-blank line; reads one line at a time."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            if len(raw) > MAX_LINE_BYTES:
                yield number, BadLine(number, None, f"longer than {MAX_LINE_BYTES // 1024 // 1024} MiB")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, BadLine(number, None, f"not valid UTF-8 (byte {exc.start})")
                continue
            try:
                yield number, json.loads(text)
            except RecursionError:
                yield number, BadLine(number, None, "not valid JSON: nested too deeply")
            except ValueError as exc:
                yield number, BadLine(number, None, f"not valid JSON ({exc})")


#: (runtime, a line's model or None, its task type, its tier) -> (task type, tier, preferred provider)
RouteModel = Callable[[Runtime, Any, str, str], tuple[str, str, str | None]]


def model_in_chain(rt: Runtime, model: Any, task: str, tier: str) -> tuple[str, str, str | None]:
    """The default: a line's model must be one of its task type's chain, placed there first."""
    return task, tier, _provider_of(rt, model, task, tier)


def check_item(
    rt: Runtime, number: int, value: Any, task: str, tier: str, route_model: RouteModel = model_in_chain
) -> BatchItem | BadLine:
    """One line (or item) turned into a job, or the reason it cannot be one."""
    if isinstance(value, BadLine):
        return value
    if not isinstance(value, Mapping):
        return BadLine(number, None, f"expected a JSON object, got {type(value).__name__}")
    custom_id = value.get("custom_id")
    if custom_id is None:
        return BadLine(number, None, "missing custom_id")
    if not isinstance(custom_id, str) or not custom_id.strip() or len(custom_id) > MAX_CUSTOM_ID:
        return BadLine(
            number,
            None,
            f"custom_id: expected a non-empty string of at most {MAX_CUSTOM_ID} "
            f"characters, got {_short(custom_id)}",
        )
    try:
        check_text(custom_id, "custom_id", max_chars=MAX_CUSTOM_ID)  # NUL, lone surrogates
    except InputError as exc:
        return BadLine(number, None, str(exc))
    try:
        fields = openai_fields(value) if is_openai_line(value) else _plain_fields(value)
        item_task, item_tier = fields.pop("task", task), fields.pop("tier", tier)
        item_task, item_tier, preferred = route_model(rt, fields.pop("model", None), item_task, item_tier)
        request = prepare(rt, item_task, item_tier, preferred_provider=preferred, **fields)
    except InputError as exc:
        return BadLine(number, custom_id, str(exc))
    except RecursionError:
        return BadLine(number, custom_id, "nested too deeply")
    return BatchItem(number, custom_id, item_task, item_tier, request, preferred)


def _provider_of(rt: Runtime, model: Any, task: str, tier: str) -> str | None:
    """The provider whose `model` the line asks for (OpenAI's body.model): it is placed there
    first, and spills over to the rest of its chain only when that provider has no room. A
    model the task type and tier cannot use is an error naming both."""
    if model is None:
        return None
    if not isinstance(model, str) or not model:
        raise InputError(f"body.model: expected a model name, got {_short(model)}")
    chain = rt.settings.chain(task, tier).candidates
    for candidate in chain:
        if model in (candidate.model, str(candidate)):
            return candidate.provider
    configured = {m for p in rt.settings.providers.values() for m in p.models}
    if model in configured:
        raise InputError(
            f"body.model: {model!r} is not in the {task}/{tier} chain "
            f"(its models: {', '.join(c.model for c in chain)})"
        )
    raise InputError(f"body.model: unknown model {model!r} (configured: {', '.join(sorted(configured))})")


def is_openai_line(value: Any) -> bool:
    """An OpenAI Batch API line (it has a `body` or a `url`), not Spillway's own format."""
    return isinstance(value, Mapping) and ("body" in value or "url" in value)


def line_format(numbered: Iterable[tuple[int, Any]]) -> str | None:
    """ "openai" when the first line that is a JSON object is an OpenAI Batch API line: the
    output is then written in OpenAI's batch output format."""
    for _, value in numbered:
        if isinstance(value, Mapping):
            return "openai" if is_openai_line(value) else None
    return None


def _plain_fields(value: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(value) - ITEM_KEYS)
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(ITEM_KEYS))})")
    return {k: v for k, v in value.items() if k != "custom_id"}


def openai_fields(value: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI Batch API line format, as OpenAI documents it."""
    unknown = sorted(set(value) - OPENAI_LINE_KEYS)
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(unknown)} in an OpenAI batch line")
    if value.get("method", "POST") != "POST":
        raise InputError(f"method: only POST is supported, got {_short(value.get('method'))}")
    if value.get("url") != OPENAI_URL:
        raise InputError(f"url: only {OPENAI_URL} is supported, got {_short(value.get('url'))}")
    body = value.get("body")
    if not isinstance(body, Mapping):
        raise InputError("body: expected a JSON object (the chat completions request)")
    unknown = sorted(set(body) - OPENAI_BODY_KEYS)
    if unknown:
        also = f" (nor {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
        raise InputError(f"body.{unknown[0]}: not supported{also}")  # the field first: OpenAI's `param`
    fields: dict[str, Any] = {"messages": body.get("messages"), "model": body.get("model")}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    for key in ("temperature", "stop"):
        if key in body:
            fields[key] = body[key]
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, Mapping) else None
        if kind not in ("json_object", "text"):
            raise InputError(f"body.response_format: only json_object or text, got {_short(response_format)}")
        fields["json_mode"] = kind == "json_object"
    return fields


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "…"


def validate(
    rt: Runtime,
    numbered: Iterable[tuple[int, Any]],
    task: str,
    tier: str,
    seen: dict[str, int] | None = None,
    route_model: RouteModel = model_in_chain,
    tokens: list[int] | None = None,
) -> tuple[int, list[BadLine]]:
    """Check every line; (count of good items, every bad line). Keeps only the custom ids: the
    good lines' go in `seen` (custom_id -> line), if given; `tokens[0]` grows by each good
    line's worst case (estimated input + max_tokens), if given."""
    seen = {} if seen is None else seen
    bad: list[BadLine] = []
    good = 0
    for number, value in numbered:
        item = check_item(rt, number, value, task, tier, route_model)
        if isinstance(item, BatchItem):
            if item.custom_id in seen:
                item = BadLine(
                    number,
                    item.custom_id,
                    f"duplicate custom_id {item.custom_id!r} (first on line {seen[item.custom_id]})",
                )
            else:
                seen[item.custom_id] = number
                good += 1
                if tokens is not None:
                    tokens[0] += item.request.estimated_input_tokens() + item.request.max_tokens
        if isinstance(item, BadLine):
            bad.append(item)
    return good, bad
