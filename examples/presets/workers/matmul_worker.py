"""Session worker for the matmul preset: a synthetic MLP (matmul_model.py), batched.

Input {"x": [2048 floats]} or {"seed": int}; output {"y0": float, "norm": float}. A bad input
fails only its own task. MATMUL_THREADS sets torch's CPU threads (default: torch's own);
MATMUL_LAYERS the number of layers (default 3: on a 2-core CPU about 2.8 ms for one input,
0.35 ms per input in a batch of 32).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from matmul_model import LAYERS, build_model, outputs_from_batch, vector_from_input

from gpulane.worker import Context, TaskError, serve


def load(ctx: Context) -> torch.nn.Module:
    if os.environ.get("MATMUL_THREADS"):
        torch.set_num_threads(int(os.environ["MATMUL_THREADS"]))
    layers = int(os.environ.get("MATMUL_LAYERS") or LAYERS)
    return build_model(layers=layers, device=ctx.device)


def handle(inputs: list[Any], ctx: Context) -> list[Any]:
    outputs: list[Any] = [None] * len(inputs)
    rows, where = [], []
    for i, inp in enumerate(inputs):
        try:
            rows.append(vector_from_input(inp))
            where.append(i)
        except ValueError as exc:
            outputs[i] = TaskError("bad_input", str(exc))
    if rows:
        with torch.inference_mode():
            y = ctx.model(torch.stack(rows).to(ctx.device))
        for i, out in zip(where, outputs_from_batch(y), strict=True):
            outputs[i] = out
    return outputs


if __name__ == "__main__":
    serve(load=load, handle=handle, batch=True)
