"""One-off worker for the ctgan-train preset: trains ctgan's CTGAN on a scikit-learn dataset.

Input (every field optional): {"dataset": "iris" | "wine" | "breast_cancer", "epochs": 10,
"batch_size": 500, "rows": 0 (all), "samples": 5, "seed": 0}. The dataset is scikit-learn's
bundled copy (no download) as a frame, its class turned into a categorical column of names
("setosa", "class_0", "malignant", ...) so the model learns a discrete column beside the
continuous ones.

Progress: CTGAN.fit has no epoch callback, and calling fit once per epoch would refit its data
transformer and restart its networks each time. Its loop does assign ``loss_values`` (a frame
with one row per epoch) at the end of every epoch, so a subclass turns that attribute into a
property whose setter emits a ``progress`` event with the epoch's losses.

Output: {"device", "dataset", "rows", "columns", "epochs", "loss": {"generator",
"discriminator"}, "fidelity": {"score", "columns": {name: {"kind", "score"}}}, "samples":
[rows], "seconds"}. Fidelity compares as many synthetic rows as real ones, column by column:
1 - the Kolmogorov-Smirnov statistic for a numeric column, 1 - the total variation distance of
the category frequencies for a categorical one; the score is their mean (1 = indistinguishable
marginals). Trains on ``cuda`` when the worker got a GPU (and CUDA is there), else the CPU.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from gpulane.worker import Context, TaskError, serve

DATASETS = ("iris", "wine", "breast_cancer")
"""scikit-learn's bundled datasets (load_<name>) the preset trains on."""

CLASS_COLUMN = "class"
"""The categorical column made of the dataset's class names."""

PAC = 10
"""CTGAN's default pac: its discriminator sees packs of 10 rows, so batch_size is a multiple."""

MIN_ROWS = 20
"""Fewest rows to train on (input.rows 0 means all of the dataset's)."""

# field: (default, lowest, highest); rows 0 = the whole dataset
LIMITS: dict[str, tuple[int, int, int]] = {
    "epochs": (10, 1, 10_000),
    "batch_size": (500, 10, 100_000),
    "rows": (0, 0, 100_000),
    "samples": (5, 0, 1000),
    "seed": (0, 0, 2**32 - 1),
}
FIELDS = ("dataset", *LIMITS)


def params_from(inp: Any) -> dict[str, Any]:
    """The input's fields with their defaults; TaskError("bad_input") naming a bad field."""
    if inp is None:
        inp = {}
    if not isinstance(inp, dict):
        raise TaskError("bad_input", f"input must be an object with any of {list(FIELDS)}")
    unknown = sorted(set(inp) - set(FIELDS))
    if unknown:
        raise TaskError("bad_input", f"unknown input field(s) {unknown}; known: {list(FIELDS)}")
    dataset = inp.get("dataset", DATASETS[0])
    if dataset not in DATASETS:
        raise TaskError("bad_input", f"input.dataset must be one of {list(DATASETS)}, "
                        f"got {dataset!r}")
    out: dict[str, Any] = {"dataset": dataset}
    for name, (default, low, high) in LIMITS.items():
        value = inp.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise TaskError("bad_input", f"input.{name} must be an integer from {low} to "
                            f"{high}, got {value!r}")
        out[name] = value
    if 0 < out["rows"] < MIN_ROWS:
        raise TaskError("bad_input", f"input.rows must be 0 (the whole dataset) or at least "
                        f"{MIN_ROWS}, got {out['rows']}")
    if out["batch_size"] % PAC:
        raise TaskError("bad_input", f"input.batch_size must be a multiple of {PAC} (CTGAN "
                        f"packs {PAC} rows per discriminator input), got {out['batch_size']}")
    return out


def dataset_frame(name: str, rows: int, seed: int) -> pd.DataFrame:
    """scikit-learn's ``load_<name>`` as a frame: its features plus CLASS_COLUMN (names)."""
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")(as_frame=True)
    frame = bunch.data.copy()
    frame[CLASS_COLUMN] = pd.Categorical.from_codes(bunch.target, list(bunch.target_names))
    frame[CLASS_COLUMN] = frame[CLASS_COLUMN].astype(str)
    if 0 < rows < len(frame):
        frame = frame.sample(n=rows, random_state=seed).reset_index(drop=True)
    return frame


def fidelity(real: pd.DataFrame, synthetic: pd.DataFrame,
             categorical: tuple[str, ...]) -> dict[str, Any]:
    """Per-column similarity of the synthetic and real marginals, and their mean."""
    from scipy.stats import ks_2samp

    columns: dict[str, dict[str, Any]] = {}
    for name in real.columns:
        if name in categorical:
            p = real[name].value_counts(normalize=True)
            q = synthetic[name].value_counts(normalize=True)
            tvd = 0.5 * float(p.sub(q, fill_value=0.0).abs().sum())
            columns[name] = {"kind": "categorical", "score": round(1.0 - tvd, 4)}
        else:
            statistic = float(ks_2samp(real[name], synthetic[name]).statistic)
            columns[name] = {"kind": "numeric", "score": round(1.0 - statistic, 4)}
    score = float(np.mean([c["score"] for c in columns.values()]))
    return {"score": round(score, 4), "columns": columns}


def with_epoch_hook(ctgan_class: type, on_epoch: Callable[[int, float, float], None]) -> Any:
    """A CTGAN subclass calling ``on_epoch(epoch, generator_loss, discriminator_loss)`` each
    time fit's loop records an epoch's losses (see the module docstring)."""

    class Reporting(ctgan_class):  # type: ignore[misc, valid-type]
        @property
        def loss_values(self) -> Any:
            return self.__dict__.get("_losses")

        @loss_values.setter
        def loss_values(self, frame: Any) -> None:
            self.__dict__["_losses"] = frame
            if frame is not None and len(frame):
                last = frame.iloc[-1]
                on_epoch(len(frame), float(last["Generator Loss"]),
                         float(last["Discriminator Loss"]))

    return Reporting


def handle(inp: Any, ctx: Context) -> dict[str, Any]:
    p = params_from(inp)  # before importing ctgan (seconds): bad input fails at once
    from ctgan import CTGAN

    real = dataset_frame(p["dataset"], p["rows"], p["seed"])
    epochs = p["epochs"]
    losses: dict[str, float | None] = {"generator": None, "discriminator": None}
    reported = []

    def on_epoch(done: int, generator: float, discriminator: float) -> None:
        losses.update(generator=round(generator, 4), discriminator=round(discriminator, 4))
        reported.append(done)
        ctx.progress(done=done, total=epochs, **losses,
                     message=f"epoch {done}/{epochs} generator {generator:+.3f} "
                             f"discriminator {discriminator:+.3f}")

    device = ctx.device if ctx.device.startswith("cuda") else "cpu"
    model = with_epoch_hook(CTGAN, on_epoch)(
        epochs=epochs, batch_size=p["batch_size"], pac=PAC, enable_gpu=device != "cpu")
    model.set_device(device)
    model.set_random_state(p["seed"])
    started = time.perf_counter()
    model.fit(real, discrete_columns=[CLASS_COLUMN])
    seconds = time.perf_counter() - started
    if len(reported) != epochs:  # a ctgan whose loop no longer records losses per epoch
        ctx.warn(f"ctgan {getattr(sys.modules['ctgan'], '__version__', '?')} reported "
                 f"{len(reported)} of {epochs} epochs: progress events are missing")
    synthetic = model.sample(len(real))
    shown = synthetic.head(p["samples"]).to_dict(orient="records")
    return {"device": device, "dataset": p["dataset"], "rows": len(real),
            "columns": list(real.columns), "epochs": epochs, "loss": losses,
            "fidelity": fidelity(real, synthetic, (CLASS_COLUMN,)), "samples": shown,
            "seconds": round(seconds, 3)}


if __name__ == "__main__":
    serve(handle=handle, batch=False)
