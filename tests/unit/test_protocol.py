"""The JSON-lines protocol between a node and its workers: parsing and encoding."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpulane.protocol import (
    PROTOCOL_VERSION,
    TASK_SCOPED_EVENTS,
    WORKER_EVENTS,
    EventType,
    Op,
    WorkerMessage,
    cancel_op,
    connection_event,
    encode,
    parse_line,
    run_op,
    shutdown_op,
)

SAMPLES: dict[EventType, dict[str, Any]] = {
    EventType.CONNECTION: {"status": "connected", "protocol": 1},
    EventType.WORKER: {"status": "ready", "pid": 123},
    EventType.PROGRESS: {"pct": 42.5, "message": "decoding"},
    EventType.TEXT_DELTA: {"text": "Hel"},
    EventType.TEXT: {"text": "Hello"},
    EventType.RESULT: {"output": {"labels": ["cat"], "score": 0.9}},
    EventType.FINISH: {},
    EventType.ERROR: {"kind": "oom", "message": "CUDA out of memory"},
    EventType.WARNING: {"message": "input.text truncated to 256 tokens"},
}


def test_samples_cover_every_worker_event() -> None:
    assert set(SAMPLES) == set(WORKER_EVENTS)
    assert TASK_SCOPED_EVENTS <= WORKER_EVENTS


@pytest.mark.parametrize("etype", list(SAMPLES), ids=lambda e: e.value)
def test_parse_every_worker_event(etype: EventType) -> None:
    line = json.dumps({"event": etype.value, **SAMPLES[etype]})
    msg = parse_line(line + "\n")
    assert msg == WorkerMessage(etype, SAMPLES[etype], None, None)


@pytest.mark.parametrize("etype", sorted(TASK_SCOPED_EVENTS, key=lambda e: e.value),
                         ids=lambda e: e.value)
def test_parse_task_scoped_events_carry_the_task(etype: EventType) -> None:
    msg = parse_line(json.dumps({"event": etype.value, "task": "abc123", **SAMPLES[etype]}))
    assert msg.type is etype and msg.task == "abc123"
    assert msg.data == SAMPLES[etype]  # neither "event" nor "task" is left in the data


@pytest.mark.parametrize(("task", "expected"), [
    ("0123456789abcdef01234567", "0123456789abcdef01234567"), (7, "7"), (None, None),
    ("", ""),
])
def test_task_ids_become_text(task: Any, expected: str | None) -> None:
    assert parse_line(json.dumps({"event": "text", "task": task, "text": "x"})).task == expected
    assert parse_line('{"event": "text", "text": "x"}').task is None


@pytest.mark.parametrize("line", [
    "loading weights...", "", "   ", "{not json", '{"event": "text"', "Traceback (most recent",
    "NaN", "[1, 2", "\x00",
])
def test_non_json_is_a_log_line(line: str) -> None:
    msg = parse_line(line + "\r\n")
    assert msg == WorkerMessage(EventType.LOG, {"line": line}, None, line)


@pytest.mark.parametrize("line", ["[1, 2, 3]", "42", '"text"', "null", "true",
                                  '[{"event": "result"}]'])
def test_json_that_is_not_an_object_is_a_log_line(line: str) -> None:
    msg = parse_line(line)
    assert msg.type is EventType.LOG and msg.data == {"line": line} and msg.raw == line


@pytest.mark.parametrize("obj", [
    {"event": "telemetry", "gpu": 1},
    {"event": "RESULT", "output": 1},  # names are case-sensitive
    {"event": None},
    {"output": 1},  # no event at all
    {"event": ["text"]},
    {"event": {"a": 1}},
    {"event": 3},
    # node-side events are never a worker's to emit
    {"event": "state", "state": "succeeded"},
    {"event": "log", "line": "x"},
    {"event": "unknown"},
])
def test_unknown_events_are_flagged_with_their_payload(obj: dict[str, Any]) -> None:
    line = json.dumps(obj)
    msg = parse_line(line)
    assert msg.type is EventType.UNKNOWN
    assert msg.data == {"event": obj.get("event"), "payload": obj}
    assert msg.raw == line and msg.task is None


def test_unknown_event_keeps_its_task() -> None:
    msg = parse_line('{"event": "custom", "task": "t1", "x": 1}')
    assert msg.type is EventType.UNKNOWN and msg.task == "t1"
    assert msg.data["payload"] == {"event": "custom", "task": "t1", "x": 1}


def test_bytes_input() -> None:
    assert parse_line(b'{"event": "text", "task": "t", "text": "\xc3\xa9"}\n') == \
        WorkerMessage(EventType.TEXT, {"text": "é"}, "t")
    msg = parse_line(b"\xff\xfe garbage \x80\n")
    assert msg.type is EventType.LOG
    assert msg.data == {"line": "\ufffd\ufffd garbage \ufffd"}
    # bad UTF-8 inside a JSON string still parses, with replacement characters
    msg = parse_line(b'{"event": "text", "text": "a\xffb"}')
    assert msg.type is EventType.TEXT and msg.data == {"text": "a\ufffdb"}


def test_only_the_line_ending_is_stripped() -> None:
    assert parse_line("  indented log  \n").data == {"line": "  indented log  "}
    assert parse_line(' {"event": "finish"} \r\n').type is EventType.FINISH


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(), st.binary()))
def test_parse_line_never_raises(line: str | bytes) -> None:
    msg = parse_line(line)
    assert msg.type in (EventType.LOG, EventType.UNKNOWN) or msg.type in WORKER_EVENTS
    assert isinstance(msg.data, dict)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(), kids, max_size=3),
    max_leaves=10)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(WORKER_EVENTS, key=lambda e: e.value)),
       st.dictionaries(st.text().filter(lambda k: k not in ("event", "task")), JSON_VALUES,
                       max_size=4),
       st.none() | st.text(min_size=1))
def test_encode_then_parse_round_trips(etype: EventType, data: dict[str, Any],
                                       task: str | None) -> None:
    obj = {"event": etype.value, **data, **({"task": task} if task is not None else {})}
    line = encode(obj)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one line, whatever the data
    assert parse_line(line) == WorkerMessage(etype, data, task)


def test_encode_is_compact_utf8_json() -> None:
    line = encode({"text": "é ✓\nnext", "n": 1})
    assert line == '{"text":"é ✓\\nnext","n":1}\n'.encode()
    assert json.loads(line) == {"text": "é ✓\nnext", "n": 1}


def test_non_finite_numbers_survive_encode_then_parse() -> None:
    msg = parse_line(encode({"event": "result", "output": {"score": math.nan, "hi": math.inf}}))
    assert msg.type is EventType.RESULT
    assert math.isnan(msg.data["output"]["score"]) and msg.data["output"]["hi"] == math.inf


def test_run_op_round_trip() -> None:
    tasks = [("t1", {"image": "a.png"}), ("t2", None), ("t3", ["é", 1.5])]
    line = run_op(tasks)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"op": "run", "tasks": [
        {"task": "t1", "input": {"image": "a.png"}}, {"task": "t2", "input": None},
        {"task": "t3", "input": ["é", 1.5]}]}
    assert json.loads(run_op([])) == {"op": Op.RUN.value, "tasks": []}


def test_cancel_and_shutdown_ops_round_trip() -> None:
    assert json.loads(cancel_op("t9")) == {"op": "cancel", "task": "t9"}
    assert json.loads(shutdown_op()) == {"op": "shutdown"}
    assert cancel_op("t9").endswith(b"\n") and shutdown_op().endswith(b"\n")


def test_connection_event_round_trip() -> None:
    msg = parse_line(encode(connection_event()))
    assert msg.type is EventType.CONNECTION
    assert msg.data == {"status": "connected", "protocol": PROTOCOL_VERSION}
