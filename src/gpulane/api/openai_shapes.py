"""The OpenAI wire shapes the compatible routes (api/openai.py) read and write: request bodies,
errors as the ``openai`` SDK reads them, embeddings, chat completions and their stream chunks.

Only the shapes: nothing here knows the node. Errors keep the project's ``code``, ``message``
and ``field`` and add OpenAI's ``type`` and ``param`` (the SDK shows ``message`` and picks its
exception class by the HTTP status: 404 is ``NotFoundError``, 422 ``UnprocessableEntityError``).
"""

from __future__ import annotations

import base64
import struct
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from gpulane.errors import RequestError, ValidationError

EMBEDDINGS_EXAMPLE = '{"model": "embed", "input": ["a sentence", "another one"]}'
"""What an embeddings body looks like (shown when the body is not a JSON object)."""
CHAT_EXAMPLE = '{"model": "echo-stream", "messages": [{"role": "user", "content": "hi"}]}'
"""What a chat completions body looks like."""
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "invalid_request_error",
               409: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error"}
"""OpenAI's error ``type`` by HTTP status; any other status is a ``server_error``."""
DONE = b"data: [DONE]\n\n"
"""The last line of an OpenAI stream."""


class EmbeddingsBody(BaseModel):
    """POST /v1/embeddings: OpenAI's fields; ``input`` is checked by ``embedding_texts``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: str | list[Any]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls...: not read

    role: str
    content: str | list[Any] | None = None


class ChatBody(BaseModel):
    """POST /v1/chat/completions. Sampling fields (temperature, max_tokens, ...) are taken
    and not read: the preset decides how it answers (docs/openai.md)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    user: str | None = None


def error_body(exc: RequestError) -> dict[str, Any]:
    """The project's error with OpenAI's ``type`` and ``param`` added."""
    body = exc.to_json()
    body["error"]["type"] = ERROR_TYPES.get(exc.status, "server_error")
    body["error"]["param"] = exc.field
    return body


def embedding_texts(value: str | list[Any], limit: int) -> list[str]:
    """The texts of an embeddings ``input``: a string or a list of 1..``limit`` strings.
    Token arrays (lists of ints) are refused: the preset embeds text."""
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise ValidationError("invalid_input", "input is an empty list: send a string or a "
                              "list of strings", field="input")
    if len(texts) > limit:
        raise ValidationError("too_many_inputs", f"input holds {len(texts)} texts; this model "
                              f"takes at most {limit} per request: split the list", field="input")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            kind = "token arrays are not supported" if isinstance(t, int | list) else \
                f"got {type(t).__name__}"
            raise ValidationError("invalid_input", f"input[{i}] is not a string ({kind}): "
                                  "send the text itself", field=f"input[{i}]")
    return texts


def embedding(vector: list[float], encoding: str) -> list[float] | str:
    """One vector as OpenAI sends it: floats, or base64 of little-endian float32 bytes."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def embeddings_answer(model: str, vectors: list[list[float]], tokens: int,
                      encoding: str) -> dict[str, Any]:
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": embedding(v, encoding)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def chat_answer(task_id: str, created: int, model: str, text: str) -> dict[str, Any]:
    """A whole chat completion (stream false)."""
    return {"id": f"chatcmpl-{task_id}", "object": "chat.completion", "created": created,
            "model": model, "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                         "message": {"role": "assistant", "content": text}}]}


def chunk(task_id: str, created: int, model: str, delta: dict[str, str],
          finish_reason: str | None = None) -> bytes:
    """One server-sent chat.completion.chunk."""
    return b"data: " + orjson.dumps({
        "id": f"chatcmpl-{task_id}", "object": "chat.completion.chunk", "created": created,
        "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish_reason}]}) + b"\n\n"


def stream_error(exc: RequestError) -> bytes:
    """An error once the stream has started (the SDK raises it as an APIError)."""
    return b"data: " + orjson.dumps(error_body(exc)) + b"\n\n"


def prompt_text(messages: list[ChatMessage]) -> str:
    """The preset's input text: the last user message's text (its text parts joined)."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.role != "user":
            continue
        if isinstance(m.content, str):
            return m.content
        parts = [p.get("text") for p in m.content or [] if isinstance(p, dict)
                 and p.get("type") == "text" and isinstance(p.get("text"), str)]
        if parts:
            return "\n".join(str(p) for p in parts)
        raise ValidationError("invalid_message", f"messages[{i}] has no text content: send "
                              "content as a string or text parts", field=f"messages[{i}].content")
    raise ValidationError("invalid_message", "messages has no user message: the preset answers "
                          "the last one", field="messages")
