"""How a task lives in a Redis hash, and how a stream entry becomes an event.

Field names are short (see redis_scripts.py for the layout): every claim and finish hands the
whole hash back, and a smaller hash is fewer bytes each way. A field that is absent is None.
Timestamps travel as ``repr`` of the float, so a task reads back exactly as it was written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from gpulane.model import DeviceWish, Event, Placement, Task, TaskSpec, TaskState


def spec_fields(task_id: str, spec: TaskSpec) -> list[str | bytes]:
    """A new task's fields that the submit script writes as they are (it adds seq, state,
    effective priority, created_at and the event counter)."""
    fields: list[str | bytes] = [
        "id", task_id, "p", spec.preset, "in", orjson.dumps(spec.input),
        "bp", str(spec.priority), "w", spec.device_wish.value, "l", spec.lane,
        "a", "0", "tk", "0"]
    if spec.timeout_s is not None:
        fields += ["to", repr(float(spec.timeout_s))]
    if spec.content_type is not None:
        fields += ["ct", spec.content_type]
    if spec.fallback_reason is not None:
        fields += ["fr", spec.fallback_reason]
    if spec.idempotency_key is not None:
        fields += ["k", spec.idempotency_key]
    if spec.submitted_by is not None:
        fields += ["by", spec.submitted_by]
    return fields


def new_task(task_id: str, spec: TaskSpec, seq: int, created: float) -> Task:
    """The task the submit script just wrote, built from what the caller sent."""
    return Task(id=task_id, preset=spec.preset, state=TaskState.QUEUED, input=spec.input,
                priority=spec.priority, device_wish=spec.device_wish, created_at=created,
                seq=seq, timeout_s=None if spec.timeout_s is None else float(spec.timeout_s),
                content_type=spec.content_type, idempotency_key=spec.idempotency_key,
                lane=spec.lane, fallback_reason=spec.fallback_reason,
                submitted_by=spec.submitted_by)


def _s(v: bytes | None) -> str | None:
    return None if v is None else v.decode()


def _f(v: bytes | None) -> float | None:
    return None if v is None else float(v)


def _j(v: bytes | None) -> Any:
    return None if v is None else orjson.loads(v)


def decode_task(flat: Sequence[bytes]) -> Task:
    """A task from a script's HGETALL answer (field, value, field, value ...)."""
    it = iter(flat)
    h: dict[bytes, bytes] = dict(zip(it, it, strict=True))
    return task_from_hash(h)


def task_from_hash(h: dict[bytes, bytes]) -> Task:
    node, device, reason = _s(h.get(b"n")), _s(h.get(b"d")), _s(h.get(b"fr"))
    return Task(
        id=h[b"id"].decode(), preset=h[b"p"].decode(), state=TaskState(h[b"s"].decode()),
        input=_j(h.get(b"in")), priority=int(h[b"bp"]),
        device_wish=DeviceWish(h[b"w"].decode()), created_at=float(h[b"c"]),
        seq=int(h[b"seq"]), output=_j(h.get(b"out")), error=_j(h.get(b"err")),
        attempts=int(h.get(b"a", 0)), timeout_s=_f(h.get(b"to")), content_type=_s(h.get(b"ct")),
        placement=Placement(node or "", device, reason) if device else None,
        started_at=_f(h.get(b"st")), finished_at=_f(h.get(b"f")),
        idempotency_key=_s(h.get(b"k")), lane=h[b"l"].decode(), fallback_reason=reason,
        token=int(h.get(b"tk", 0)), submitted_by=_s(h.get(b"by")))


def event_args(events: Sequence[tuple[str, Any]]) -> list[str | bytes]:
    """Events as the scripts take them: type, JSON data, type, JSON data ..."""
    out: list[str | bytes] = []
    for etype, data in events:
        out += [etype, orjson.dumps(data)]
    return out


def decode_entries(task_id: str,
                   entries: Sequence[tuple[bytes, Sequence[bytes] | dict[bytes, bytes]]]
                   ) -> list[Event]:
    """Stream entries (id ``<number>-0``; fields t, d, ts, as a flat list or a dict) as
    events."""
    out = []
    for eid, fields in entries:
        f = fields if isinstance(fields, dict) else dict(zip(fields[::2], fields[1::2],
                                                                 strict=True))
        out.append(Event(task_id, int(eid.split(b"-", 1)[0]), f[b"t"].decode(),
                         orjson.loads(f[b"d"]), float(f[b"ts"])))
    return out
