"""The OpenAI-compatible face: ``GET /v1/models``, ``POST /v1/embeddings``, ``POST
/v1/chat/completions`` (streamed or whole), so that the ``openai`` SDK and what is built on it
reach the GPUs through gpulane.

A protocol adapter, not a second API: each request becomes one ordinary task of the preset
named as its ``model`` (a preset lists what it serves under ``serves``), queued, batched,
placed, retried and keyed like any other. Embeddings send ``{"texts": [...]}`` so that a list
counts towards the preset's batch item by item; chat sends the last user message as
``{"text": ...}`` and streams the task's ``text_delta`` events back as chunks. Keys are the
same keys (the ``tasks`` scope); errors carry OpenAI's ``type`` and ``param`` besides the
project's ``code``, ``message`` and ``field`` (api/openai_shapes.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from gpulane.api.auth import caller
from gpulane.api.bodies import read_body
from gpulane.api.openai_shapes import (
    CHAT_EXAMPLE,
    DONE,
    EMBEDDINGS_EXAMPLE,
    ChatBody,
    EmbeddingsBody,
    chat_answer,
    chunk,
    embedding_texts,
    embeddings_answer,
    error_body,
    prompt_text,
    stream_error,
)
from gpulane.api.responses import JSON
from gpulane.api.tasks import SSE_KEEPALIVE_S, errors, json_body
from gpulane.errors import NotFoundError, RequestError, UnavailableError, ValidationError
from gpulane.model import Task, TaskState
from gpulane.node import Node
from gpulane.presets import Preset, Serves

router = APIRouter(prefix="/v1", tags=["openai"])

WAIT_SLACK_S = 5.0
"""Past a preset's start and run timeouts, how much longer a request waits for its task."""
REFUSALS = (400, 404, 413, 415, 422, 429, 500, 503)
"""The error statuses a submitting route may answer (500: the task failed, not on its input)."""
OWNER = "gpulane"
"""``owned_by`` of every model listed."""

_cancels: set[asyncio.Task[Any]] = set()  # cancels of abandoned streams, kept until done


def _node(request: Request) -> Node:
    node: Node = request.app.state.node
    return node


def _model(node: Node, name: str, serves: Serves) -> Preset:
    """The preset named as ``model``: 404 when there is none that serves ``serves``."""
    preset = node.registry.get(name)
    if preset is None or serves not in preset.serves:
        offered = sorted(p.name for p in node.registry.values() if serves in p.serves)
        raise NotFoundError("model_not_found", f"no model {name!r} serves {serves.value}: "
                            f"use one of {offered} (GET /v1/models)", field="model")
    return preset


def _wait_s(preset: Preset) -> float:
    return preset.start_timeout_s + preset.timeout_s + WAIT_SLACK_S


async def _submit(request: Request, preset: Preset, task_input: dict[str, Any]) -> Task:
    who = caller(request)
    node = _node(request)
    spec = node.build_spec(preset=preset.name, input=task_input,
                           submitted_by=who.name if who is not None else None)
    task, _ = await node.submit(spec)
    return task


def _failed(task: Task) -> RequestError:
    """Why a task did not succeed, as the request's error: the caller's input (400) or the
    service (500), with the task's id to look it up by."""
    err = task.error or {}
    message = f"task {task.id} {task.state.value}: {err.get('message', 'no error given')}"
    if err.get("kind") == "bad_input":
        return ValidationError("bad_input", message, field="input")
    failure = RequestError(str(err.get("code") or "task_failed"), message)
    failure.status = 500
    return failure


async def _final(node: Node, task: Task, preset: Preset) -> Task:
    """The task once it ended successfully; its failure as an error, or 503 (the task
    cancelled) when it did not end in time."""
    task = await node.wait(task.id, _wait_s(preset))
    if not task.state.final:
        await node.cancel(task.id)
        raise UnavailableError("task_timeout", f"task {task.id} did not end within "
                               f"{_wait_s(preset):.0f} s; it was cancelled: retry later",
                               headers={"Retry-After": "1"})
    if task.state is not TaskState.SUCCEEDED:
        raise _failed(task)
    return task


def _openai_errors(exc: RequestError) -> JSON:
    return JSON(error_body(exc), status_code=exc.status, headers=exc.headers)


@router.get("/models")
async def list_models(request: Request) -> JSON:
    """The presets that serve embeddings or chat, as OpenAI models (``id`` is the preset)."""
    node = _node(request)
    return JSON({"object": "list", "data": [
        {"id": p.name, "object": "model", "created": 0, "owned_by": OWNER,
         "serves": [s.value for s in p.serves]}
        for p in node.registry.values() if p.serves]})


@router.get("/models/{model}", responses=errors(404))
async def get_model(request: Request, model: str) -> JSON:
    preset = _node(request).registry.get(model)
    if preset is None or not preset.serves:
        return _openai_errors(NotFoundError("model_not_found", f"no model {model!r}: see GET "
                                            "/v1/models", field="model"))
    return JSON({"id": preset.name, "object": "model", "created": 0, "owned_by": OWNER,
                 "serves": [s.value for s in preset.serves]})


@router.post("/embeddings", responses=errors(*REFUSALS),
             openapi_extra=json_body("EmbeddingsBody"))
async def embeddings(request: Request) -> JSON:
    """Embed a string or a list of strings in one task of the preset (a list counts towards
    its batch item by item); ``encoding_format: base64`` sends little-endian float32 bytes."""
    try:
        node = _node(request)
        body = await read_body(request, EmbeddingsBody, EMBEDDINGS_EXAMPLE)
        preset = _model(node, body.model, Serves.EMBEDDINGS)
        texts = embedding_texts(body.input, preset.batch.max_size)
        task = await _final(node, await _submit(request, preset, {"texts": texts}), preset)
        out = task.output if isinstance(task.output, dict) else {}
        vectors = out.get("vectors")
        if not isinstance(vectors, list) or len(vectors) != len(texts):
            failure = RequestError("bad_output", f"task {task.id} of {preset.name!r} answered "
                                   "no 'vectors' list of one vector per text")
            failure.status = 500
            raise failure
        if body.dimensions is not None and body.dimensions != out.get("dim"):
            raise ValidationError("unsupported_dimensions", f"model {preset.name!r} makes "
                                  f"{out.get('dim')}-dimensional vectors only: omit dimensions "
                                  f"or send {out.get('dim')}", field="dimensions")
        return JSON(embeddings_answer(preset.name, vectors, int(out.get("tokens") or 0),
                                      body.encoding_format))
    except RequestError as exc:
        return _openai_errors(exc)


@router.post("/chat/completions", response_model=None, responses={
    200: {"content": {"application/json": {}, "text/event-stream": {}},
          "description": "the whole completion, or its chunks as Server-Sent Events"},
    **errors(*REFUSALS)}, openapi_extra=json_body("ChatBody"))
async def chat_completions(request: Request) -> JSON | StreamingResponse:
    """A protocol adapter: the last user message's text goes to the preset as ``{"text"}``;
    its ``text_delta`` events come back as chunks (``stream: true``) or as one message."""
    try:
        node = _node(request)
        body = await read_body(request, ChatBody, CHAT_EXAMPLE)
        preset = _model(node, body.model, Serves.CHAT)
        task = await _submit(request, preset, {"text": prompt_text(body.messages)})
        if body.stream:
            return StreamingResponse(_stream(node, task, preset.name, _wait_s(preset)),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        task = await _final(node, task, preset)
        out = task.output if isinstance(task.output, dict) else {}
        return JSON(chat_answer(task.id, int(task.created_at), preset.name,
                                str(out.get("text", ""))))
    except RequestError as exc:
        return _openai_errors(exc)


async def _stream(node: Node, task: Task, model: str, wait_s: float) -> AsyncIterator[bytes]:
    created = int(task.created_at)
    ended = False
    # The same bound as a whole answer's: a task that never starts (no room on any device)
    # would otherwise hold the stream open forever, its keep-alives resetting the SDK's
    # read timeout.
    deadline = time.monotonic() + wait_s
    try:
        yield chunk(task.id, created, model, {"role": "assistant", "content": ""})
        async for batch in node.follow(task.id, 0, SSE_KEEPALIVE_S):
            if not batch:
                yield b": keep-alive\n\n"
            for event in batch:
                if event.type == "text_delta":
                    yield chunk(task.id, created, model,
                                {"content": str(event.data.get("delta", ""))})
            if time.monotonic() > deadline:
                break
        final = await node.get(task.id)
        if not final.state.final:
            yield stream_error(UnavailableError(
                "task_timeout", f"task {task.id} did not end within {wait_s:.0f} s; it was "
                "cancelled: retry later"))
            yield DONE
            return
        ended = final.state.final
        if final.state is TaskState.SUCCEEDED:
            yield chunk(task.id, created, model, {}, "stop")
        else:
            yield stream_error(_failed(final))
        yield DONE
    finally:
        if not ended:  # the client went away: its task's work is wasted, stop it
            cancel = asyncio.get_running_loop().create_task(node.cancel(task.id))
            _cancels.add(cancel)
            cancel.add_done_callback(_cancels.discard)

