"""Every request body and query parameter of the API, as pydantic models and annotated types.

These are the one validation source: FastAPI builds the OpenAPI document from them and the
endpoints validate with them, so a bound written here is both published and enforced. Each
field's :func:`~gpulane.api.validation.fix` gives the project's error code and message for it.
Checks that need the node (a preset's name, a device's index, what a preset accepts) stay in
the node and the lease manager.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Header, Query
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    Field,
    WrapValidator,
    model_validator,
)

from gpulane.api.validation import custom, fix
from gpulane.config import (
    DEFAULT_LEASE_GRACE_S,
    DEFAULT_LEASE_TTL_S,
    LEASE_GRACE_MAX_S,
    LEASE_TTL_MAX_S,
    LEASE_TTL_MIN_S,
    LEASE_WAIT_MAX_S,
)
from gpulane.errors import RequestError, ValidationError
from gpulane.model import Priority
from gpulane.presets import MAX_GPUS, parse_size_mb
from gpulane.presets.content_types import is_pattern, normalize

BULK_MAX = 10_000
"""Most tasks one bulk submit may carry: the whole bulk is one request body and one store
transaction, which should stay well under a second."""
RESULT_WAIT_MAX_S = 300.0
"""Longest a ?wait= long-poll may hold a request; clients long-poll again for longer waits."""
TIMEOUT_MAX_S = 7 * 86400
"""Longest timeout_s a task may ask for: a week; longer work should checkpoint."""

TASK_EXAMPLE = '{"preset": "sleep", "input": {}}'
"""A valid submit body, shown when a body is not a JSON object."""

NODE_NAME_MAX = 253
"""Longest node name a request may give (a host name's limit)."""

LEASE_EXAMPLE = '{"holder": "ml-service", "vram_mb": 4096}'
"""A valid lease request, shown when a body is not a JSON object."""


def _priority(value: object) -> object:
    """A priority name or integer as its integer (Priority.parse holds the rules)."""
    try:
        return Priority.parse(value)
    except RequestError as exc:
        raise ValueError(exc.message) from None


PriorityField = Annotated[
    Literal["immediate", "normal", "background"] | Annotated[int, Field(ge=0, le=100)],
    BeforeValidator(_priority),
    fix("invalid_priority", "{field}={value!r} is not a priority: use immediate, normal, "
        "background or an integer 0-100")]
"""``immediate``, ``normal``, ``background`` or 0-100 (names in any case, digits as text)."""


TimeoutSeconds = (Annotated[int, Field(strict=True, gt=0, le=TIMEOUT_MAX_S)]
                  | Annotated[float, Field(strict=True, gt=0, le=TIMEOUT_MAX_S)])
"""A JSON number of seconds in (0, a week]; an int stays an int, for idempotency hashes
compare the body as it was sent."""


def _concrete_type(value: str | None) -> str | None:
    """A task's content type names one type (``image/png; q=1``): ``*/*`` or ``image/*`` would
    match every route's pattern, and text without a slash none but ``*/*``."""
    if value is not None and (not is_pattern(normalize(value)) or "*" in value):
        raise ValueError("not a content type")
    return value


class TaskSubmit(BaseModel):
    """Body of POST /v1/tasks (and each item of a bulk submit)."""

    preset: Annotated[Annotated[str, Field(min_length=1)] | None, Field(description=(
        "name one of this node's presets (GET /v1/presets lists them); left out, the task "
        "goes to the preset its content_type is routed to (GET /v1/routes)")),
        fix("missing_field", "{field} must name one of this node's presets (GET /v1/presets "
            "lists them), or be left out with a content_type to route by")] = None
    input: Any = Field(None, description="the preset's input, any JSON")
    device: Annotated[Literal["auto", "gpu", "cpu"],
                      fix("invalid_device", "{field}={value!r} is not one of auto, gpu, cpu")
                      ] = Field("auto", description=(
                          "auto (a GPU first, the CPU as the preset's fallback policy allows), "
                          "gpu (a GPU only) or cpu; ?gpu=true|false says the same"))
    fallback: Annotated[Annotated[bool, Field(strict=True)] | None, fix(
        "invalid_fallback", "{field}={value!r} must be true or false: false runs the task "
        "on a GPU or not at all, true (the default) lets it fall back to the CPU as its "
        "preset's fallback policy allows")] = Field(
        None, description="false: a GPU or nothing (an auto task is stored as device=gpu)")
    priority: PriorityField = Field("normal", validate_default=True, description=(
        "immediate, normal, background or 0-100"))
    timeout_s: Annotated[
        TimeoutSeconds | None,
        fix("invalid_timeout", "{field}={value!r} must be a number of seconds between 0 and "
            f"{TIMEOUT_MAX_S}")] = Field(None, description="overrides the preset's timeout_s")
    content_type: Annotated[str | None, AfterValidator(_concrete_type), fix(
        "unsupported_content_type", "{field}={value!r} must be a content type such as "
        "\"image/png\" (type/subtype, no wildcard; the preset's accepts lists them)")] = Field(
        None, description="what the input is (e.g. image/png): it must match one of the "
        "preset's accepts, and routes the task when preset is left out")
    idempotency_key: Annotated[str | None, fix(
        "invalid_request", "{field}={value!r} must be a string such as \"order-42\": a key "
        "you choose, the same for a retry of the same task")] = Field(
        None, description="bulk only; single submits use the Idempotency-Key header")


class BulkSubmit(BaseModel):
    """Body of POST /v1/tasks/bulk: one transaction, all or none."""

    tasks: Annotated[list[TaskSubmit], Field(min_length=1, max_length=BULK_MAX),
                     fix("invalid_tasks", "{field} must be a non-empty list of task bodies",
                         cases={"too_long": ("too_many_tasks", "{field} has {actual_length} "
                                             "items; send at most {max_length} per request"),
                                "missing": ("invalid_tasks", "{field} must be a non-empty "
                                            "list of task bodies")})
                     ] = Field(description="a non-empty list of task bodies")


RESULTS_MAX = 1_000
"""Most task ids one POST /v1/tasks/results may ask about: one store read for the lot."""
TASK_ID_MAX = 100
"""Longest text taken as a task id (ids are 24 hex digits; a longer one is simply missing)."""
RESULTS_EXAMPLE = '{"ids": ["0193b1c2d3e4a1b2c3d4e5f6"]}'
"""A valid results request, shown when a body is not a JSON object."""


class ResultsQuery(BaseModel):
    """Body of POST /v1/tasks/results: the tasks whose ends the caller collects."""

    ids: Annotated[list[Annotated[str, Field(strict=True, max_length=TASK_ID_MAX)]],
                   Field(min_length=1, max_length=RESULTS_MAX),
                   fix("invalid_ids", "{field} must be a non-empty list of task ids "
                       "(strings)", cases={"too_long": (
                           "too_many_ids", "{field} has {actual_length} ids; send at most "
                           "{max_length} per request")})
                   ] = Field(description=f"1 to {RESULTS_MAX} task ids")


def _query_bool(value: object) -> object:
    """``true``/``false`` in any case as a bool; anything else stays text and is refused."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


GpuQuery = Annotated[
    Annotated[bool, Field(strict=True)] | None,
    BeforeValidator(_query_bool),
    Query(description="true: device=gpu (a GPU only); false: device=cpu. For bulk submits, "
          "every task. A body device of gpu or cpu must agree"),
    fix("invalid_gpu", "{field}={value!r} must be true or false: ?gpu=true runs the task on "
        "a GPU (device=gpu), ?gpu=false on the CPU (device=cpu)")]
"""?gpu=true|false on submit: the device wish as apps that ask "GPU or not" send it."""


def resolve_device(item: TaskSubmit, gpu: bool | None, where: str = "") -> str:
    """The device a submit asks for, from the body's ``device`` and the query's ``?gpu=``
    (a body ``auto`` leaves the choice to the query); a 422 naming both fields when they, or
    ``device`` and ``fallback``, disagree."""
    query = None if gpu is None else "gpu" if gpu else "cpu"
    shown = "" if gpu is None else f"?gpu={str(gpu).lower()}"
    if query is not None and item.device != "auto" and item.device != query:
        raise ValidationError(
            "conflicting_device", f"{where}device={item.device!r} and {shown} disagree "
            f"({shown} means device={query!r}): send only one of them, or make them agree",
            field=f"{where}device")
    device = query if query is not None and item.device == "auto" else item.device
    said = f"{where}device={device!r}" + (f" ({shown})" if query is not None else "")
    if item.fallback is False and device == "cpu":
        raise ValidationError(
            "conflicting_fallback", f"{where}fallback=false asks for a GPU or nothing but "
            f"{said} asks for the CPU: leave out fallback, or use device 'gpu' or 'auto'",
            field=f"{where}fallback")
    if item.fallback is True and device == "gpu":
        raise ValidationError(
            "conflicting_fallback", f"{where}fallback=true lets the task fall back to the CPU "
            f"but {said} allows only a GPU: leave out fallback, or use device 'auto'",
            field=f"{where}fallback")
    return device


WaitQuery = Annotated[
    Annotated[float, Field(ge=0, le=RESULT_WAIT_MAX_S)] | None,
    BeforeValidator(lambda v: None if v == "" else v),
    Query(description="seconds to wait for the task to end before answering"),
    fix("invalid_wait", "{field}={value!r} must be a number of seconds between 0 and "
        f"{RESULT_WAIT_MAX_S:g}")]
"""?wait=S on submit and result: how long the answer may wait for the task's end."""

StateQuery = Annotated[
    Literal["queued", "running", "succeeded", "failed", "cancelled"] | None,
    BeforeValidator(lambda v: None if v == "" else v),
    Query(description="only tasks in this state"),
    fix("invalid_state", "{field}={value!r} is not one of "
        "['queued', 'running', 'succeeded', 'failed', 'cancelled']")]

LimitQuery = Annotated[int, Query(ge=1, le=1000, description="page size"),
                       fix("invalid_limit", "{field}={value} must be 1-1000", types_too=False,
                           cases={"int_parsing": ("invalid_request", "{field}={value!r} must "
                                                  "be a whole number 1-1000 (the page size)")})]

NUMBER_DIGITS_MAX = 18
"""Most digits a cursor or an event number may have: the store keeps them as SQLite (64-bit)
integers, and a longer one would fail there (or in int()) as a 500 instead of a 422."""

EVENT_ID_PATTERN = rf"^[0-9]{{0,{NUMBER_DIGITS_MAX}}}$"
"""A Last-Event-ID: an event number, or empty for the first."""

CursorQuery = Annotated[
    str | None, Query(pattern=rf"^[0-9]{{1,{NUMBER_DIGITS_MAX}}}$",
                      description="next_cursor of the previous page"),
    fix("invalid_cursor", "{field} must be a next_cursor value from a previous page")]

LastEventIdHeader = Annotated[
    str | None, Header(alias="Last-Event-ID", pattern=EVENT_ID_PATTERN, description=(
        "resume after this event number")),
    fix("invalid_last_event_id", "{field}={value!r} must be an event number from this stream",
        field="Last-Event-ID")]

LastEventIdQuery = Annotated[
    str | None, Query(pattern=EVENT_ID_PATTERN, description=(
        "resume after this event number (for clients that cannot set headers)")),
    fix("invalid_last_event_id", "{field}={value!r} must be an event number from this stream",
        field="Last-Event-ID")]

RELEASE_TOKEN_FIX = ("missing_field", "token is required: DELETE /v1/leases/{{id}}?token=<the "
                     "grant's token>")
"""A release without a usable token: code and message."""

LeaseTokenQuery = Annotated[
    int | None, Query(description="the grant's fencing token"),
    fix(*RELEASE_TOKEN_FIX, field="token")]

LeaseTokenHeader = Annotated[
    int | None, Header(alias="X-Lease-Token", description="the grant's token, as a header"),
    fix(*RELEASE_TOKEN_FIX, field="token")]


def _seconds_fix(name: str, lo: float, hi: float) -> WrapValidator:
    return fix(f"invalid_{name}", "{field}={value!r} must be a number of seconds between "
               f"{lo:g} and {hi:g}")


TtlSeconds = Annotated[
    Annotated[int, Field(strict=True, ge=LEASE_TTL_MIN_S, le=LEASE_TTL_MAX_S)]
    | Annotated[float, Field(strict=True, ge=LEASE_TTL_MIN_S, le=LEASE_TTL_MAX_S)],
    _seconds_fix("ttl_s", LEASE_TTL_MIN_S, LEASE_TTL_MAX_S)]
WaitSeconds = Annotated[
    Annotated[int, Field(strict=True, ge=0, le=LEASE_WAIT_MAX_S)]
    | Annotated[float, Field(strict=True, ge=0, le=LEASE_WAIT_MAX_S)],
    _seconds_fix("wait_s", 0, LEASE_WAIT_MAX_S)]
GraceSeconds = Annotated[
    Annotated[int, Field(strict=True, ge=0, le=LEASE_GRACE_MAX_S)]
    | Annotated[float, Field(strict=True, ge=0, le=LEASE_GRACE_MAX_S)],
    _seconds_fix("grace_s", 0, LEASE_GRACE_MAX_S)]
GpuCount = Annotated[int, Field(strict=True, ge=0, le=MAX_GPUS),
                     fix("invalid_gpus", "{field}={value!r} must be an integer "
                         f"0-{MAX_GPUS}")]
DeviceIndex = Annotated[int, Field(strict=True, ge=0, le=1 << 16),
                        fix("invalid_device", "{field}={value!r} must be an integer "
                            f"0-{1 << 16}")]


def _size(value: object) -> object:
    """"4GiB", "512MiB": what people write for a size (numbers pass through)."""
    if isinstance(value, str):
        return parse_size_mb(value, "vram_mb")
    return value


class LeaseBody(BaseModel):
    """Body of POST /v1/leases."""

    holder: Annotated[str, Field(min_length=1, description=(
        "name the service asking, e.g. \"ml-service\"")), BeforeValidator(
        lambda v: v.strip() if isinstance(v, str) else v),
        fix("missing_field", "{field} is required: name the service asking, "
            "e.g. \"ml-service\"")]
    vram_mb: Annotated[
        Annotated[int, Field(strict=True, ge=0, le=1 << 30)] | str,
        BeforeValidator(_size),
        fix("invalid_vram_mb", "{field}={value!r} must be an integer 0-1073741824 or a size "
            "such as \"4GiB\"")] = Field(
        0, validation_alias=AliasChoices("vram_mb", "vram"),
        description="MiB of one GPU (or a size such as \"4GiB\"); 0 with gpus")
    gpus: GpuCount = Field(0, description="whole devices; 0 for a slice")
    device: DeviceIndex | None = Field(None, description="this GPU only")
    priority: PriorityField = Field("normal", validate_default=True)
    ttl_s: TtlSeconds = DEFAULT_LEASE_TTL_S
    wait_s: WaitSeconds = 0
    grace_s: GraceSeconds = DEFAULT_LEASE_GRACE_S
    preemptible: Annotated[bool, Field(strict=True), fix(
        "invalid_preemptible", "preemptible must be true or false")] = True
    node: Annotated[str | None, Field(min_length=1, max_length=NODE_NAME_MAX), fix(
        "invalid_node", "{field}={value!r} must be the name of a live node (GET /v1/nodes "
        "lists them), or left out for any node that can serve it")] = Field(
        None, description="the node whose GPUs to lease (default: this node, else any)")

    @model_validator(mode="after")
    def _one_shape(self) -> LeaseBody:
        if self.gpus == 0 and self.vram_mb == 0:
            raise custom("missing_field", "ask for vram_mb (a slice of one GPU) or gpus "
                         "(whole devices)", "vram_mb")
        if self.device is not None and self.gpus > 1:
            raise custom("invalid_device", f"device={self.device} names one GPU but "
                         f"gpus={self.gpus} asks for {self.gpus}: give only one of them",
                         "device")
        return self

    def vram_mib(self) -> int:
        """vram_mb as MiB (a size string was turned into MiB while validating)."""
        assert isinstance(self.vram_mb, int)
        return self.vram_mb


class RenewBody(BaseModel):
    """Body of POST /v1/leases/{id}/renew."""

    token: Annotated[int, Field(strict=True, description=(
        "send the token the grant returned")), fix(
        "invalid_token", "{field}={value!r} must be the integer token the grant returned")]
