"""Calls between nodes over Redis: a request published on the callee's channel, the answer
pushed to a reply list the caller pops.

Wire: the caller PUBLISHes ``{"id", "op", "payload", "reply", "from"}`` (JSON) on
``gl:db{N}:call:{node}``; the callee's subscriber runs its handler as an asyncio task and LPUSHes
``{"ok": answer}`` or ``{"error": {"status", "code", "message", "field", "extra",
"headers"}}`` to the ``reply`` key, which expires ``REPLY_TTL_S`` later (an answer nobody
waits for any more goes by itself); the caller BLPOPs it for ``timeout_s``.

What fails how:

- PUBLISH reached no subscriber: the node is not listening (stopping, or its Redis
  connection is down): ``node_unreachable`` (503, Retry-After) at once, nothing was done.
- no answer within ``timeout_s``: ``node_unreachable`` too, but the handler may still run
  to its end there (it is not cancelled; its answer expires unread).
- the handler raised a RequestError: the caller raises the same class, chosen by status,
  with its code, message, field, extra and headers. Any other exception answers 500
  ``internal`` (logged on the callee).
- Redis down: StoreUnavailableError on the caller; the subscriber reconnects with backoff
  (``RESUBSCRIBE_BACKOFF_S``, doubling to ``RESUBSCRIBE_BACKOFF_MAX_S``) and subscribes again,
  so calls reach the node again once Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import redis.asyncio as aioredis

from gpulane.errors import (
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    RequestError,
    TooManyRequestsError,
    UnavailableError,
    UnsupportedMediaTypeError,
    ValidationError,
)
from gpulane.fleet.base import Handler
from gpulane.fleet.local import run_handler, unknown_node, unreachable

log = logging.getLogger("gpulane.fleet")

REPLY_TTL_S = 30
"""How long an answer waits in its reply list for a caller that may have given up."""

RESUBSCRIBE_BACKOFF_S = 0.1
"""First wait before the subscriber reconnects after losing Redis."""

RESUBSCRIBE_BACKOFF_MAX_S = 2.0
"""Longest wait between the subscriber's reconnects."""

POLL_S = 1.0
"""How long the subscriber waits for a message before looking whether it should stop."""

SUBSCRIBE_WAIT_S = 2.0
"""How long ``open`` waits for the first subscription before going on (it keeps trying)."""

STOP_GRACE_S = 5.0
"""How long a stopping node lets the answers it is working on finish before it cancels them."""

BLOCK_GUARD_S = 2.0
"""Margin over a blocking command's own timeout before the client gives it up."""

ERROR_CLASSES: dict[int, type[RequestError]] = {
    c.status: c for c in (NotFoundError, ConflictError, PayloadTooLargeError,
                          UnsupportedMediaTypeError, ValidationError, TooManyRequestsError,
                          UnavailableError)}
"""The RequestError class a status is raised as on the caller's side (else RequestError)."""


def channel(prefix: str, node: str) -> str:
    return f"{prefix}call:{node}"


def encode_error(exc: RequestError) -> dict[str, Any]:
    return {"error": {"status": exc.status, "code": exc.code, "message": exc.message,
                      "field": exc.field, "extra": exc.extra, "headers": exc.headers}}


def decode_error(e: dict[str, Any]) -> RequestError:
    """The RequestError an answer's ``error`` stands for, of the class its status names."""
    status = int(e.get("status", 500))
    cls = ERROR_CLASSES.get(status, RequestError)
    err = cls(str(e.get("code", "internal")), str(e.get("message", "")), e.get("field"),
              extra=dict(e.get("extra") or {}), headers=dict(e.get("headers") or {}))
    if cls is RequestError:
        err.status = status  # a status without a class of its own (408, 500): kept as sent
    return err


class Link(Protocol):
    """What calls need of their RedisFleet (a protocol, so this module does not import it)."""

    name: str
    prefix: str
    channel_prefix: str
    client: aioredis.Redis
    blocking: aioredis.Redis

    def node_key(self, node: str) -> str: ...
    def reaching(self, what: str) -> AbstractAsyncContextManager[None]: ...
    def blocking_slot(self, what: str) -> AbstractAsyncContextManager[None]: ...


class Calls:
    """Both sides of calls for one RedisFleet: ``call`` and the subscriber serving this node."""

    def __init__(self, fleet: Link) -> None:
        self.fleet = fleet
        self.handler: Handler | None = None
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[Any]] = set()
        self.served = 0
        self.made = 0
        self.resubscribes = 0

    # -- the callee ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start serving (once a handler is set and the fleet is open)."""
        if self.handler is not None and self._task is None:
            self._task = asyncio.create_task(self._serve(), name="gpulane-fleet-calls")

    async def wait_subscribed(self) -> None:
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.subscribed.wait(), SUBSCRIBE_WAIT_S)

    async def stop(self) -> None:
        """Stop listening; answers being worked on get ``STOP_GRACE_S`` to finish."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.subscribed.clear()
        if self._running:
            _, late = await asyncio.wait(self._running, timeout=STOP_GRACE_S)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late)

    async def _serve(self) -> None:
        backoff = RESUBSCRIBE_BACKOFF_S
        name = channel(self.fleet.channel_prefix, self.fleet.name)
        while True:
            pubsub = self.fleet.blocking.pubsub()
            try:
                await pubsub.subscribe(name)
                self.subscribed.set()
                backoff = RESUBSCRIBE_BACKOFF_S
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=POLL_S)
                    if msg is not None and msg.get("type") == "message":
                        self._spawn(msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: listen again once it is back
                if self.subscribed.is_set():  # said once per outage, not at every try
                    log.warning("fleet calls: lost the subscription to %s (%s); subscribing "
                                "again with backoff", name, exc)
                self.subscribed.clear()
                self.resubscribes += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RESUBSCRIBE_BACKOFF_MAX_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _spawn(self, data: str) -> None:
        try:
            req = json.loads(data)
            reply, op, payload = str(req["reply"]), str(req["op"]), dict(req["payload"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("fleet calls: dropped a malformed request: %s", exc)
            return
        task = asyncio.create_task(self._answer(reply, op, payload))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _answer(self, reply: str, op: str, payload: dict[str, Any]) -> None:
        assert self.handler is not None
        try:
            answer: dict[str, Any] = {"ok": await self.handler(op, payload)}
        except RequestError as exc:
            answer = encode_error(exc)
        except Exception as exc:
            log.exception("fleet calls: handler for %r failed", op)
            answer = {"error": {"status": 500, "code": "internal",
                                "message": f"node {self.fleet.name!r} failed on {op!r}: "
                                           f"{type(exc).__name__}: {exc}"}}
        self.served += 1
        try:
            async with self.fleet.client.pipeline(transaction=True) as p:
                p.lpush(reply, json.dumps(answer))
                p.expire(reply, REPLY_TTL_S)
                await p.execute()
        except Exception as exc:  # Redis down: the caller times out and may ask again
            log.warning("fleet calls: could not answer %r: %s", op, exc)

    # -- the caller ----------------------------------------------------------------------------

    async def call(self, node: str, op: str, payload: dict[str, Any],
                   timeout_s: float) -> dict[str, Any]:
        fleet = self.fleet
        if node == fleet.name:
            return await run_handler(node, self.handler, op, payload, timeout_s, self._running)
        # The slot (a blocking connection for the answer) is taken before the request goes:
        # one refused must not leave the other node doing what nobody waits for.
        async with fleet.blocking_slot(f"the call {op} to node {node}"):
            got = await self._ask(node, op, payload, timeout_s)
        if got is None:
            raise unreachable(node, f"gave no answer to {op!r} within {timeout_s:g} s")
        answer = json.loads(got[1])
        if "error" in answer:
            raise decode_error(answer["error"])
        result: dict[str, Any] = answer["ok"]
        return result

    async def _ask(self, node: str, op: str, payload: dict[str, Any],
                   timeout_s: float) -> Any:
        """Publish the request to ``node`` and wait for its answer: None if none came."""
        fleet = self.fleet
        reply = f"{fleet.prefix}reply:{uuid.uuid4().hex}"
        request = json.dumps({"id": reply.rsplit(":", 1)[1], "op": op, "payload": payload,
                              "reply": reply, "from": fleet.name})
        async with fleet.reaching(f"call {op} to node {node}"):
            if not await fleet.client.exists(fleet.node_key(node)):
                raise unknown_node(node)
            receivers = await fleet.client.publish(channel(fleet.channel_prefix, node), request)
        if not receivers:
            raise unreachable(node, "is not listening for calls (stopping, or cut off from "
                                    "Redis)")
        self.made += 1
        wait_s = max(timeout_s, 0.01)  # BLPOP's 0 would wait for ever
        async with fleet.reaching(f"answer of node {node} to {op}"):
            return await asyncio.wait_for(fleet.blocking.blpop([reply], timeout=wait_s),
                                          wait_s + BLOCK_GUARD_S)

    def view(self) -> dict[str, Any]:
        return {"subscribed": self.subscribed.is_set(), "served": self.served,
                "made": self.made, "resubscribes": self.resubscribes,
                "in_flight": len(self._running)}
