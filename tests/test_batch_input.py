"""Batch input: every kind of bad line is reported with its line number; nothing is enqueued."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.batchfile import BadLine, BatchItem, check_item, read_jsonl, validate


@pytest.fixture
def rt(make_rt):
    return make_rt()


def lines_file(tmp_path: Path, lines: list[str | bytes]) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


def test_every_kind_of_bad_line(rt, tmp_path) -> None:
    nested = "[" * 5000 + "]" * 5000
    path = lines_file(
        tmp_path,
        [
            '{"custom_id": "ok-1", "prompt": "fine"}',  # 1
            '{"custom_id": "x", "prompt": ',  # 2 bad JSON
            '["a list"]',  # 3 not an object
            '{"prompt": "no id"}',  # 4 missing custom_id
            '{"custom_id": "ok-1", "prompt": "again"}',  # 5 duplicate
            '{"custom_id": "e", "prompt": "   "}',  # 6 empty prompt
            '{"custom_id": "t", "prompt": "x", "task": "poetry"}',  # 7 unknown task type
            '{"custom_id": "r", "prompt": "x", "tier": "gold"}',  # 8 unknown tier
            '{"custom_id": "m", "prompt": "x", "max_tokens": 999999}',  # 9 beyond the model
            b'{"custom_id": "u", "prompt": "\xff\xfe"}',  # 10 invalid UTF-8
            '{"custom_id": "f", "prompt": "x", "colour": "red"}',  # 11 unknown field
            '{"custom_id": "n", "prompt": "x", "max_tokens": "many"}',  # 12 wrong type
            '{"custom_id": 7, "prompt": "x"}',  # 13 custom_id type
            nested,  # 14 nested deeply
            "",  # 15 blank: skipped
            '{"custom_id": "ok-2", "messages": [{"role": "user", "content": "hi"}]}',  # 16 fine
            '{"custom_id": "g", "messages": [{"role": "robot", "content": "hi"}]}',  # 17 bad role
        ],
    )
    good, bad = validate(rt, read_jsonl(path), "chat", "free")
    assert good == 2
    by_line = {b.line: b.error for b in bad}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 17]
    assert by_line[2].startswith("not valid JSON")
    assert by_line[3] == "expected a JSON object, got list"
    assert by_line[4] == "missing custom_id"
    assert by_line[5] == "duplicate custom_id 'ok-1' (first on line 1)"
    assert by_line[6] == "prompt: is empty"
    assert "unknown task type 'poetry'" in by_line[7]
    assert "unknown tier 'gold'" in by_line[8]
    assert (
        by_line[9] == "max_tokens: 999999 is more than any model of the chat/free chain allows (at most 8192)"
    )
    assert by_line[10] == "not valid UTF-8 (byte 30)"
    assert by_line[11].startswith("unknown field(s) colour")
    assert by_line[12] == "max_tokens: expected a positive integer, got 'many'"
    assert by_line[13].startswith("custom_id: expected a non-empty string")
    assert "nested too deeply" in by_line[14] or "not valid JSON" in by_line[14]
    assert by_line[17].startswith("messages[0].role: expected one of system, user, assistant")
    assert str(BadLine(5, "ok-1", by_line[5])) == "line 5: duplicate custom_id 'ok-1' (first on line 1)"


def test_openai_batch_line_format(rt) -> None:
    line = {
        "custom_id": "job-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "bm",  # a model of the chat/free chain: placed on its provider first
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "max_completion_tokens": 20,
            "temperature": 0.3,
            "response_format": {"type": "json_object"},
        },
    }
    item = check_item(rt, 1, line, "chat", "free")
    assert isinstance(item, BatchItem) and item.custom_id == "job-1"
    assert item.request.max_tokens == 20 and item.request.json_mode and item.request.temperature == 0.3
    assert [m.role for m in item.request.messages] == ["system", "user"]
    assert item.preferred_provider == "b"
    unnamed = check_item(
        rt, 1, {**line, "body": {k: v for k, v in line["body"].items() if k != "model"}}, "chat", "free"
    )
    assert isinstance(unnamed, BatchItem) and unnamed.preferred_provider is None  # the chain decides
    for change, error in (
        (
            {"body": {**line["body"], "model": "gpt-4o-mini"}},
            "body.model: unknown model 'gpt-4o-mini' (configured: am, bm)",
        ),
        (
            {"body": {**line["body"], "model": "bm"}},
            "body.model: 'bm' is not in the solo/free chain (its models: am)",
        ),
        ({"url": "/v1/embeddings"}, "url: only /v1/chat/completions"),
        ({"method": "GET"}, "method: only POST"),
        ({"body": {"messages": [], "n": 3}}, "body.n: not supported"),
        ({"body": {"messages": [], "tools": [], "n": 3}}, "body.n: not supported (nor tools)"),
    ):
        task = "solo" if "solo" in error else "chat"
        bad = check_item(rt, 2, {**line, **change}, task, "free")
        assert isinstance(bad, BadLine) and bad.error.startswith(error), bad


def test_items_may_override_task_tier_and_sizes(rt) -> None:
    item = check_item(
        rt,
        1,
        {"custom_id": "s", "prompt": "x", "task": "solo", "tier": "free", "max_tokens": 7},
        "chat",
        "free",
    )
    assert (item.task, item.tier, item.request.max_tokens) == ("solo", "free", 7)


def test_lines_the_store_could_not_hold_are_bad_lines(rt, tmp_path) -> None:
    """PostgreSQL refuses NUL and lone surrogates, and every column has a length: such a line is
    a bad line here, never a database error (and a batch row with no jobs) later."""
    path = lines_file(
        tmp_path,
        [
            '{"custom_id": "a\\u0000", "prompt": "x"}',  # 1 NUL
            '{"custom_id": "\\ud800", "prompt": "x"}',  # 2 a lone surrogate
            '{"custom_id": "t", "prompt": "x", "task": "' + "t" * 65 + '"}',  # 3 longer than its column
            '{"custom_id": "m", "prompt": "x", "max_tokens": 1' + "0" * 30 + "}",  # 4 no model makes that
            '{"custom_id": "s", "prompt": "x", "stop": ["\\ud800"]}',  # 5 a lone surrogate
            '{"custom_id": "fine", "prompt": "x"}',  # 6
        ],
    )
    seen: dict[str, int] = {}
    good, bad = validate(rt, read_jsonl(path), "chat", "free", seen=seen)
    assert (good, seen) == (1, {"fine": 6})
    by_line = {b.line: b for b in bad}
    assert by_line[1].error == "custom_id: must not contain NUL (\\x00), found at character 1"
    assert by_line[2].error == "custom_id: not valid UTF-8 (a lone surrogate at character 0)"
    assert by_line[1].custom_id is None and by_line[2].custom_id is None  # not storable either
    assert by_line[3].error == "task: at most 64 characters, got 65"
    assert by_line[4].error.startswith("max_tokens: expected a positive integer of at most 1,000,000")
    assert by_line[5].error == "stop[0]: not valid UTF-8 (a lone surrogate at character 0)"
