"""One-off worker for the xgboost-train preset: trains a classifier on synthetic data.

Input (every field optional): {"rows": 5000, "features": 20, "rounds": 50, "max_depth": 6,
"learning_rate": 0.3, "seed": 0}. The data is generated with numpy (a noisy non-linear rule),
80% train / 20% validation. A `progress` event follows every boosting round with the
validation logloss; the output is {"device", "rounds", "metric": {"name", "value"},
"accuracy", "rows", "features", "seconds"}. Trains with device "cuda" when the worker got a
GPU (and CUDA is there), else "cpu".
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from gpulane.worker import Context, TaskError, serve

# field: (default, lowest, highest)
LIMITS: dict[str, tuple[float, float, float]] = {
    "rows": (5000, 100, 2_000_000),
    "features": (20, 2, 2000),
    "rounds": (50, 1, 5000),
    "max_depth": (6, 1, 20),
    "learning_rate": (0.3, 1e-4, 1.0),
    "seed": (0, 0, 2**32 - 1),
}
METRIC = "logloss"


def load(ctx: Context) -> Any:
    import xgboost

    return xgboost


def params_from(inp: Any) -> dict[str, Any]:
    if inp is None:
        inp = {}
    if not isinstance(inp, dict):
        raise TaskError("bad_input", f"input must be an object with any of {sorted(LIMITS)}")
    unknown = sorted(set(inp) - set(LIMITS))
    if unknown:
        raise TaskError("bad_input", f"unknown input field(s) {unknown}; known: {sorted(LIMITS)}")
    out: dict[str, Any] = {}
    for name, (default, low, high) in LIMITS.items():
        value = inp.get(name, default)
        whole = isinstance(default, int)
        if isinstance(value, bool) or not isinstance(value, int if whole else int | float) \
                or not low <= value <= high:
            kind = "an integer" if whole else "a number"
            raise TaskError("bad_input", f"input.{name} must be {kind} from {low:g} to "
                            f"{high:g}, got {value!r}")
        out[name] = value
    return out


def synthetic(rows: int, features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A binary task a linear model cannot quite learn: a linear score plus interactions."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features), dtype=np.float32)
    w = rng.standard_normal(features).astype(np.float32)
    score = x @ w + 1.5 * x[:, 0] * x[:, 1] - np.abs(x[:, -1])
    score += rng.normal(0, 0.5, rows).astype(np.float32)
    return x, (score > np.median(score)).astype(np.float32)


def handle(inp: Any, ctx: Context) -> dict[str, Any]:
    xgb = ctx.model
    p = params_from(inp)
    device = "cuda" if ctx.device.startswith("cuda") else "cpu"
    x, y = synthetic(p["rows"], p["features"], p["seed"])
    cut = int(len(y) * 0.8)
    dtrain = xgb.DMatrix(x[:cut], label=y[:cut])
    dvalid = xgb.DMatrix(x[cut:], label=y[cut:])
    rounds = p["rounds"]

    class Progress(xgb.callback.TrainingCallback):
        def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
            value = float(evals_log["validation"][METRIC][-1])
            ctx.progress(done=epoch + 1, total=rounds, metric=METRIC, value=value,
                         message=f"round {epoch + 1}/{rounds} validation {METRIC} {value:.4f}")
            return False  # keep going

    started = time.perf_counter()
    booster = xgb.train(
        {"objective": "binary:logistic", "eval_metric": METRIC, "tree_method": "hist",
         "device": device, "max_depth": p["max_depth"], "eta": p["learning_rate"],
         "seed": p["seed"]},
        dtrain, num_boost_round=rounds, evals=[(dvalid, "validation")], verbose_eval=False,
        callbacks=[Progress()])
    seconds = time.perf_counter() - started
    evals = booster.eval(dvalid)  # "[0]\tvalidation-logloss:0.1234"
    logloss = float(evals.rsplit(":", 1)[1])
    accuracy = float(((booster.predict(dvalid) > 0.5) == y[cut:]).mean())
    return {"device": device, "rounds": rounds, "metric": {"name": METRIC, "value": logloss},
            "accuracy": round(accuracy, 4), "rows": p["rows"], "features": p["features"],
            "seconds": round(seconds, 3)}


if __name__ == "__main__":
    serve(load=load, handle=handle, batch=False)
