"""The server side of each wire format: read a request, write answers and errors exactly
in the shapes the providers document (``shared/provider-protocols.md``)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

from workers.messages import estimate_tokens

WORDS = (
    "spill over quota bucket token refill minute window provider route queue worker chord "
    "batch stream answer model limit retry header signal account key budget tier job"
).split()


class BadSimRequest(Exception):
    """The request breaks the format; answered 400 with the format's error body."""


@dataclass(frozen=True)
class SimRequest:
    model: str
    key: str | None
    texts: tuple[str, ...]  # every message's text (system included), for token counting
    max_tokens: int
    json_mode: bool = False
    prefill: str = ""
    tokenizer: str = "estimate"  # the provider's count: see `count_tokens`

    @property
    def input_tokens(self) -> int:
        return count_tokens(self.texts, self.tokenizer) + 3 * len(self.texts)


#: CJK scripts: punctuation, kana, ideographs and extensions, Hangul, compatibility and
#: full-width forms.
_CJK = re.compile("[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")


def count_tokens(texts: tuple[str, ...], tokenizer: str) -> int:
    """ "estimate": Spillway's own estimate (four characters a token). "cjk": like a real
    tokenizer, which spends about 1.25 tokens on a CJK character — five times the estimate."""
    if tokenizer == "estimate":
        return estimate_tokens(texts)
    total = 0
    for text in texts:
        cjk = len(_CJK.findall(text))
        total += math.ceil((len(text) - cjk) / 4) + math.ceil(cjk * 1.25)
    return total


def reply(request: SimRequest, provider: str) -> tuple[str, int, bool]:
    """A deterministic completion: (text, output tokens, cut at max_tokens). One word = one token."""
    digest = hashlib.sha256("\x00".join((provider, request.model, *request.texts)).encode()).digest()
    natural = 8 + digest[0] % 48
    count = min(natural, request.max_tokens)
    words = [WORDS[b % len(WORDS)] for b in (digest * 4)[:count]]
    if request.json_mode:
        body = json.dumps({"answer": " ".join(words[1:])})
        return (body[len(request.prefill) :] if request.prefill else body), count, count < natural
    return " ".join(words), count, count < natural


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise BadSimRequest(message)


class SimFormat:
    name: ClassVar[str]

    def parse(self, path: str, headers: Any, body: Any, query: dict[str, str]) -> SimRequest:
        raise NotImplementedError

    def success(self, req: SimRequest, text: str, finish_length: bool, out_tokens: int) -> dict[str, Any]:
        raise NotImplementedError

    def error(
        self, status: int, kind: str, message: str, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        raise NotImplementedError


class OpenAIFormat(SimFormat):
    name = "openai"
    TYPES: ClassVar[dict[str, str]] = {
        "rate_limit": "requests",
        "insufficient_quota": "insufficient_quota",
        "auth": "invalid_request_error",
        "bad_request": "invalid_request_error",
        "model_not_found": "invalid_request_error",
        "server": "server_error",
        "overloaded": "server_error",
    }
    CODES: ClassVar[dict[str, str | None]] = {
        "rate_limit": "rate_limit_exceeded",
        "insufficient_quota": "insufficient_quota",
        "auth": "invalid_api_key",
        "model_not_found": "model_not_found",
        "bad_request": None,
        "server": None,
        "overloaded": None,
    }

    def parse(self, path: str, headers: Any, body: Any, query: dict[str, str]) -> SimRequest:
        _require(path.endswith("/chat/completions"), f"unknown path {path}")
        _require(isinstance(body, dict), "the body must be a JSON object")
        messages = body.get("messages")
        _require(isinstance(messages, list) and messages, "'messages' is a required property")
        texts = []
        for m in messages:
            _require(
                isinstance(m, dict) and m.get("role") in ("system", "developer", "user", "assistant"),
                "each message needs a valid role",
            )
            _require(isinstance(m.get("content"), str), "message content must be a string")
            texts.append(m["content"])
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 4096))
        _require(isinstance(max_tokens, int) and max_tokens > 0, "max_tokens must be a positive integer")
        auth = headers.get("authorization") or ""
        key = auth[7:] if auth.lower().startswith("bearer ") else None
        fmt = (body.get("response_format") or {}).get("type")
        return SimRequest(
            str(body.get("model", "")),
            key,
            tuple(texts),
            max_tokens,
            json_mode=fmt in ("json_object", "json_schema"),
        )

    def success(self, req: SimRequest, text: str, finish_length: bool, out_tokens: int) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "length" if finish_length else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": req.input_tokens,
                "completion_tokens": out_tokens,
                "total_tokens": req.input_tokens + out_tokens,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
        }

    def error(
        self, status: int, kind: str, message: str, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        error_type = (extra or {}).get("type") or self.TYPES.get(kind, "invalid_request_error")
        return {
            "error": {"message": message, "type": error_type, "param": None, "code": self.CODES.get(kind)}
        }


class AnthropicFormat(SimFormat):
    name = "anthropic"
    TYPES: ClassVar[dict[str, str]] = {
        "rate_limit": "rate_limit_error",
        "insufficient_quota": "rate_limit_error",
        "auth": "authentication_error",
        "bad_request": "invalid_request_error",
        "model_not_found": "not_found_error",
        "server": "api_error",
        "overloaded": "overloaded_error",
    }

    def parse(self, path: str, headers: Any, body: Any, query: dict[str, str]) -> SimRequest:
        _require(path.endswith("/v1/messages"), f"unknown path {path}")
        _require(headers.get("anthropic-version") is not None, "anthropic-version header is required")
        _require(isinstance(body, dict), "the body must be a JSON object")
        _require(isinstance(body.get("max_tokens"), int), "max_tokens: Field required")
        messages = body.get("messages")
        _require(isinstance(messages, list) and messages, "messages: Field required")
        texts = []
        system = body.get("system")
        if isinstance(system, str) and system:
            texts.append(system)
        elif isinstance(system, list):
            texts.append("".join(b.get("text", "") for b in system if isinstance(b, dict)))
        for m in messages:
            _require(
                isinstance(m, dict) and m.get("role") in ("user", "assistant"),
                "messages: roles must be user or assistant",
            )
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
            _require(isinstance(content, str), "message content must be text")
            texts.append(content)
        prefill = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        # x-api-key as documented; newer SDKs (anthropic 2.x) send the key as a bearer token.
        auth = headers.get("authorization") or ""
        key = headers.get("x-api-key") or (auth[7:] if auth.lower().startswith("bearer ") else None)
        return SimRequest(
            str(body.get("model", "")),
            key,
            tuple(texts),
            body["max_tokens"],
            json_mode=prefill.startswith("{"),
            prefill=prefill if isinstance(prefill, str) else "",
        )

    def success(self, req: SimRequest, text: str, finish_length: bool, out_tokens: int) -> dict[str, Any]:
        return {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": req.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "max_tokens" if finish_length else "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": req.input_tokens,
                "output_tokens": out_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }

    def error(
        self, status: int, kind: str, message: str, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.TYPES.get(kind, "invalid_request_error"), "message": message}
        if kind == "insufficient_quota":
            error["details"] = {"error_code": "enforced_spend_limit_reached"}
        return {"type": "error", "error": error, "request_id": f"req_{uuid.uuid4().hex[:24]}"}


class GeminiFormat(SimFormat):
    name = "gemini"
    STATUS: ClassVar[dict[int, str]] = {
        400: "INVALID_ARGUMENT",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        429: "RESOURCE_EXHAUSTED",
        500: "INTERNAL",
        503: "UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
    }

    def parse(self, path: str, headers: Any, body: Any, query: dict[str, str]) -> SimRequest:
        _require(path.endswith(":generateContent") and "/models/" in path, f"unknown path {path}")
        model = path.rsplit("/models/", 1)[1].rsplit(":", 1)[0]
        _require(isinstance(body, dict), "the body must be a JSON object")
        contents = body.get("contents")
        _require(isinstance(contents, list) and contents, "contents is not specified")
        texts = []
        system = body.get("systemInstruction") or body.get("system_instruction")
        if isinstance(system, dict):
            texts.append("".join(p.get("text", "") for p in system.get("parts", [])))
        for c in contents:
            _require(
                isinstance(c, dict) and c.get("role", "user") in ("user", "model"),
                "Please use a valid role: user, model.",
            )
            texts.append("".join(p.get("text", "") for p in c.get("parts", []) if isinstance(p, dict)))
        config = body.get("generationConfig") or {}
        max_tokens = config.get("maxOutputTokens", 8192)
        _require(isinstance(max_tokens, int) and max_tokens > 0, "maxOutputTokens must be positive")
        key = headers.get("x-goog-api-key") or query.get("key")
        return SimRequest(
            model,
            key,
            tuple(texts),
            max_tokens,
            json_mode=config.get("responseMimeType") == "application/json",
        )

    def success(self, req: SimRequest, text: str, finish_length: bool, out_tokens: int) -> dict[str, Any]:
        return {
            "candidates": [
                {
                    "content": {"role": "model", "parts": [{"text": text}]},
                    "finishReason": "MAX_TOKENS" if finish_length else "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": req.input_tokens,
                "candidatesTokenCount": out_tokens,
                "totalTokenCount": req.input_tokens + out_tokens,
            },
            "modelVersion": req.model,
        }

    def error(
        self, status: int, kind: str, message: str, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        details = list((extra or {}).get("details") or [])
        if kind == "auth":
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                }
            )
        error: dict[str, Any] = {
            "code": status,
            "message": message,
            "status": self.STATUS.get(status, "UNKNOWN"),
        }
        if details:
            error["details"] = details
        return {"error": error}


FORMATS: dict[str, SimFormat] = {f.name: f for f in (OpenAIFormat(), AnthropicFormat(), GeminiFormat())}
