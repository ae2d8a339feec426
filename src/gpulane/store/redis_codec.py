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
from gpulane.store.base import LaneStats, QueuedTask, QueueStats


def spec_args(task_id: str, spec: TaskSpec) -> list[str | bytes]:
    """A new task as the submit script takes it (redis_scripts.SUBMIT says the order): it
    writes the hash, adding seq, state, effective priority, created_at and the counters."""
    first = {"state": "queued", "lane": spec.lane, "fallback_reason": spec.fallback_reason}
    return [task_id, spec.idempotency_key or "", spec.body_hash or "", spec.preset, spec.lane,
            str(spec.priority), orjson.dumps(first), orjson.dumps(spec.input),
            spec.device_wish.value,
            "" if spec.timeout_s is None else repr(float(spec.timeout_s)),
            spec.content_type or "", spec.fallback_reason or "", spec.submitted_by or ""]


_STATES = {s.value.encode(): s for s in TaskState}
_WISHES = {w.value.encode(): w for w in DeviceWish}


def _s(v: bytes | None) -> str | None:
    return None if v is None else v.decode()


def _f(v: bytes | None) -> float | None:
    return None if v is None else float(v)


def _j(v: bytes | None) -> Any:
    return None if v is None else orjson.loads(v)


def decode_task(flat: Sequence[bytes]) -> Task:
    """A task from an HGETALL answer (field, value, field, value ...)."""
    h: dict[bytes, bytes] = dict(zip(flat[::2], flat[1::2], strict=True))
    get = h.get
    node, device, reason = get(b"n"), get(b"d"), get(b"fr")
    reason_s = None if reason is None else reason.decode()
    return Task(
        id=h[b"id"].decode(), preset=h[b"p"].decode(), state=_STATES[h[b"s"]],
        input=_j(get(b"in")), priority=int(h[b"bp"]), device_wish=_WISHES[h[b"w"]],
        created_at=float(h[b"c"]), seq=int(h[b"seq"]), output=_j(get(b"out")),
        error=_j(get(b"err")), attempts=int(get(b"a", 0)), timeout_s=_f(get(b"to")),
        content_type=_s(get(b"ct")),
        placement=(Placement("" if node is None else node.decode(), device.decode(), reason_s)
                   if device is not None else None),
        started_at=_f(get(b"st")), finished_at=_f(get(b"f")),
        idempotency_key=_s(get(b"k")), lane=h[b"l"].decode(), fallback_reason=reason_s,
        token=int(get(b"tk", 0)), submitted_by=_s(get(b"by")))


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


def decode_queue_stats(flat: Sequence[bytes]) -> dict[str, QueueStats]:
    """Per preset, from the stats hash (field, value ...): ``q:<preset>`` queued,
    ``l:<lane>:<preset>`` queued in a lane, ``c:<preset>`` claims; the rest is not per
    preset."""
    queued: dict[str, int] = {}
    claimed: dict[str, int] = {}
    lanes: dict[str, dict[str, int]] = {}
    for k, v in zip(flat[::2], flat[1::2], strict=True):
        kind, _, rest = k.decode().partition(":")
        if kind == "q":
            queued[rest] = int(v)
        elif kind == "c":
            claimed[rest] = int(v)
        elif kind == "l" and int(v) > 0:
            lane, _, preset = rest.partition(":")
            lanes.setdefault(preset, {})[lane] = int(v)
    return {p: QueueStats(queued.get(p, 0), claimed.get(p, 0), lanes.get(p, {}))
            for p in queued.keys() | claimed.keys()}


def decode_queued(rows: Sequence[Sequence[bytes]]) -> list[QueuedTask]:
    """The QUEUED script's answer: (id, device wish, created_at) per task."""
    return [QueuedTask(tid.decode(), _WISHES[wish], float(created))
            for tid, wish, created in rows]


def decode_lane_stats(rows: Sequence[Sequence[bytes]]) -> dict[tuple[str, str], LaneStats]:
    """The LANE_STATS script's answer: (preset, lane, queued, running, oldest created_at)."""
    return {(preset.decode(), lane.decode()): LaneStats(
                int(queued), int(running), float(since) if since else None)
            for preset, lane, queued, running, since in rows}
