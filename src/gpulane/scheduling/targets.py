"""What a submit targets: its preset (named, or routed by its content type through the
registry's ``routes:``) and its device wish once the request's ``fallback`` is applied.

The node's ``build_spec`` calls these before the router picks a lane; they raise the caller's
errors (404 unknown_preset, 415 no_route, 422 unsupported_content_type) with the field and
the fix.
"""

from __future__ import annotations

from typing import Any

from gpulane.errors import NotFoundError, UnsupportedMediaTypeError, ValidationError
from gpulane.model import DeviceWish, TaskSpec
from gpulane.presets import Preset, PresetRegistry
from gpulane.presets.content_types import accepted
from gpulane.scheduling.router import Route
from gpulane.store import body_hash


def target_preset(registry: PresetRegistry, preset: str | None, content_type: str | None,
                  where: str = "") -> Preset:
    """The preset a submit names, else the one its content type is routed to; the content
    type (when given) must be one the preset accepts."""
    if preset is None:
        if content_type is None:
            raise ValidationError(
                "missing_field", f"{where}preset is required: name one of this node's presets "
                "(GET /v1/presets lists them), or give content_type to route the task by it "
                "(GET /v1/routes lists the routes)", field=f"{where}preset")
        name = registry.routes.match(content_type)
        if name is None:
            known = registry.routes.patterns()
            raise UnsupportedMediaTypeError(
                "no_route", f"{where}content_type={content_type!r} has no route: "
                + (f"send one of the routed types {known} (GET /v1/routes), or name the "
                   "preset" if known else "this node has no routes, so name the preset"),
                field=f"{where}content_type", extra={"routes": registry.routes.view()})
        preset = name
    found = registry.get(preset)
    if found is None:
        raise NotFoundError(
            "unknown_preset", f"{where}preset {preset!r} is not known here: use one "
            f"of {registry.names()} (GET /v1/presets lists them)", field=f"{where}preset")
    if content_type is not None and not accepted(found.accepts, content_type):
        raise ValidationError(
            "unsupported_content_type", f"{where}content_type={content_type!r} is not "
            f"accepted by preset {found.name!r}: use one of {list(found.accepts)}",
            field=f"{where}content_type")
    return found


def device_wish(preset: Preset, device: str, fallback: bool | None) -> DeviceWish:
    """The wish as stored: a request's ``fallback: false`` (a GPU or nothing) turns ``auto``
    into ``gpu`` where the preset can use a GPU; a CPU-only preset just runs on the CPU. The
    API refused the combinations that contradict themselves (fallback: false with cpu)."""
    wish = DeviceWish(device)
    if fallback is False and wish is DeviceWish.AUTO and preset.allows_gpu:
        return DeviceWish.GPU
    return wish


def task_spec(preset: Preset, wish: DeviceWish, route: Route, input_as_sent: Any,
              resolved_input: Any, *, priority: int, timeout_s: float | None,
              content_type: str | None, idempotency_key: str | None,
              submitted_by: str | None) -> TaskSpec:
    """The spec the store queues: the input with its file references resolved, and (for a
    keyed submit) the hash of the request as sent with its wish resolved, so that the same
    request in two spellings is the same task and a changed one is a 409."""
    return TaskSpec(
        preset=preset.name, input=resolved_input, device_wish=wish, priority=priority,
        timeout_s=float(timeout_s) if timeout_s is not None else None,
        content_type=content_type, idempotency_key=idempotency_key,
        body_hash=body_hash({"preset": preset.name, "input": input_as_sent,
                             "device": wish.value, "priority": priority,
                             "timeout_s": timeout_s, "content_type": content_type})
        if idempotency_key else None, lane=route.lane,
        fallback_reason=route.fallback_reason, submitted_by=submitted_by,
        durable=preset.durable)
