"""Session worker for the matmul-onnx preset: the matmul MLP run by ONNX Runtime, batched.

At load the very model of the torch preset (matmul_model.build_model, seed 0) is exported with
torch.onnx (the dynamo exporter, a dynamic batch axis) to bytes in memory, and opened with
``ctx.onnx_session``: the providers that fit the worker's device, CPU last. Written once, it
runs on an NVIDIA GPU (onnxruntime-gpu), an AMD one (onnxruntime-rocm / -migraphx), DirectML
or the CPU. Input and output as the matmul preset's, plus "provider": the one that ran it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from matmul_model import LAYERS, WIDTH, build_model, outputs_from_batch, vector_from_input

from gpulane.worker import Context, TaskError, serve

INPUT = "x"
"""The exported graph's input name."""


def export(model: torch.nn.Module, width: int = WIDTH) -> bytes:
    """``model`` as ONNX bytes, its batch axis dynamic (1 to 4096 rows)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model, (torch.zeros(2, width),), input_names=[INPUT],
                                output_names=["y"], dynamic_shapes=({0: batch},), dynamo=True)
    if program is None:  # typed Optional: only the legacy exporter to a file returns None
        raise RuntimeError("torch.onnx.export returned no program")
    return bytes(program.model_proto.SerializeToString())


def load(ctx: Context) -> Any:
    layers = int(os.environ.get("MATMUL_LAYERS") or LAYERS)
    return ctx.onnx_session(export(build_model(layers=layers)))


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
        session = ctx.model
        (y,) = session.run(None, {INPUT: torch.stack(rows).numpy()})
        provider = session.get_providers()[0]
        for i, out in zip(where, outputs_from_batch(torch.from_numpy(y)), strict=True):
            outputs[i] = {**out, "provider": provider}
    return outputs


if __name__ == "__main__":
    serve(load=load, handle=handle, batch=True)
