"""The matmul preset's model: an MLP of square Linear layers with ReLU, built from code.

Kept apart from the worker so a benchmark's offline "ideal" loop can build the very same model
and batches: ``build_model()`` and ``batch_from_inputs([{"seed": 1}, {"x": [...]}])``.
"""

from __future__ import annotations

from typing import Any

import torch

WIDTH = 2048
LAYERS = 3
SEED = 0


def build_model(width: int = WIDTH, layers: int = LAYERS, seed: int = SEED,
                device: str = "cpu") -> torch.nn.Module:
    """``layers`` Linear(width, width) layers with ReLU between them; float32, eval mode.

    The weights depend only on ``seed`` (the global RNG is left as it was).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules: list[torch.nn.Module] = []
        for i in range(layers):
            modules.append(torch.nn.Linear(width, width))
            if i < layers - 1:
                modules.append(torch.nn.ReLU())
        model = torch.nn.Sequential(*modules)
    return model.to(device=device, dtype=torch.float32).eval()


def vector_from_input(inp: Any, width: int = WIDTH) -> torch.Tensor:
    """One input row: ``{"x": [width floats]}`` or ``{"seed": int}`` (a fixed random vector).

    Raises ValueError naming the problem.
    """
    if not isinstance(inp, dict):
        raise ValueError(f'input must be {{"x": [{width} floats]}} or {{"seed": int}}')
    if "x" in inp:
        x = inp["x"]
        if not isinstance(x, list) or len(x) != width:
            got = f"{len(x)} values" if isinstance(x, list) else type(x).__name__
            raise ValueError(f"input.x must be a list of {width} numbers, got {got}")
        try:
            return torch.tensor(x, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"input.x must hold numbers only: {exc}") from None
    seed = inp.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"input.seed must be an integer >= 0 (or give input.x), got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(width, generator=generator, dtype=torch.float32)


def batch_from_inputs(inputs: list[Any], width: int = WIDTH) -> torch.Tensor:
    """A (len(inputs), width) float32 batch; raises ValueError on the first bad input."""
    return torch.stack([vector_from_input(inp, width) for inp in inputs])


def outputs_from_batch(y: torch.Tensor) -> list[dict[str, float]]:
    """Small per-row outputs: the first value and the L2 norm."""
    first = y[:, 0].tolist()
    norms = torch.linalg.vector_norm(y, dim=1).tolist()
    return [{"y0": f, "norm": n} for f, n in zip(first, norms, strict=True)]
