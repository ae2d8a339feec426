"""An ML service engine that trains XGBoost in its own process, on a GPU leased from gpulane.

    python examples/ml_service.py --url http://127.0.0.1:8765 --rounds 50

The pattern, for any service whose engines drive the GPU themselves:

1. Ask gpulane for a lease: ``client.gpu(vram=..., priority=..., wait_s=...)``. gpulane
   books the VRAM so that its own workers and other services keep off it, and renews the
   lease in the background while the block runs.
2. Train on ``cuda:N``, N being the device the lease names.
3. When gpulane cannot be reached, or no GPU frees up within ``wait_s``, train on the CPU
   instead. A service must keep working when its GPU broker does not.
4. When the lease is preempted mid-training (an urgent job needs the GPU), stop at the end of
   the boosting round, let the GPU go, and finish the remaining rounds on the CPU.

Every run returns (and the CLI prints) a report::

    {"device": "cuda:0" | "cpu",       # the GPU the lease granted, or cpu without one
     "trained_on": "cuda:0" | "cpu" | "cuda:0, then cpu",   # where the rounds really ran
     "reason": "lease granted" | "gpulane unreachable: ..." | "lease wait timed out: ..."
               | "lease preempted: ..." | "gpulane error: ..." (it answered 5xx),
     "note": None | "why trained_on differs from device",
     "lease_id": "lease-..." | None, "rounds": 50, "accuracy": 0.93, "seconds": 1.2}

On a gpulane node with simulated GPUs (a laptop, CI) the lease is real but no CUDA device
stands behind it: the lease says ``"simulated": true`` and the training runs on the CPU.

From asyncio code, run ``train`` in a thread (``await asyncio.to_thread(train, ...)``): it
blocks while XGBoost trains, and ``Client.gpu`` renews the lease from its own thread.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import xgboost as xgb

from gpulane.client import Client, RetryPolicy
from gpulane.errors import APIError, LeasePreempted, TransportError

# The lease names GPUs by NVML's index, which counts by PCI bus; make CUDA count the same way.
# (This must happen before CUDA starts in this process, hence at import.)
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")

CLIENT_TIMEOUT = httpx.Timeout(connect=2.0, read=15.0, write=15.0, pool=5.0)
"""A short connect timeout: an unreachable gpulane should cost seconds, not minutes."""
CLIENT_RETRY = RetryPolicy(max_attempts=1)
"""One try per call: the CPU is the fallback, so waiting out retries on a bad link gains
little. (A lease wait that timed out is never retried by the SDK: it is an answer.) The
lease's renewals retry on their own until its TTL runs out."""

DEFAULT_PARAMS: dict[str, Any] = {"objective": "binary:logistic", "eval_metric": "logloss",
                                  "tree_method": "hist", "max_depth": 6, "learning_rate": 0.3}

Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def make_dataset(rows: int = 20_000, features: int = 20, seed: int = 0) -> Data:
    """A binary task with interactions a linear model cannot learn; 80% train, 20% test."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    score = x[:, 0] + 0.5 * x[:, 1] - x[:, 2] * x[:, 3] + np.sin(2 * x[:, 4])
    y = (score + rng.normal(scale=0.3, size=rows) > 0).astype(np.float32)
    cut = int(rows * 0.8)
    return x[:cut], y[:cut], x[cut:], y[cut:]


class StopWhen(xgb.callback.TrainingCallback):
    """Ends training after the current boosting round once ``should_stop()`` says so."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        super().__init__()
        self.should_stop = should_stop

    def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
        return self.should_stop()


def fit(data: Data, params: dict[str, Any], rounds: int, device: str, *,
        start: xgb.Booster | None = None,
        should_stop: Callable[[], bool] = lambda: False) -> tuple[xgb.Booster, str | None]:
    """Train ``rounds`` more rounds on ``device`` (continuing ``start`` if given).

    Returns the booster and, when XGBoost could not use the GPU it was given and quietly
    trained on the CPU, a note saying so.
    """
    x_train, y_train, _, _ = data
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        booster = xgb.train({**params, "device": device}, xgb.DMatrix(x_train, label=y_train),
                            num_boost_round=rounds, xgb_model=start,
                            callbacks=[StopWhen(should_stop)])
    if any("from GPU to CPU" in str(w.message) for w in seen):
        return booster, f"xgboost found no usable GPU for {device}: trained on the CPU"
    return booster, None


def accuracy(booster: xgb.Booster, data: Data) -> float:
    _, _, x_test, y_test = data
    predicted = booster.predict(xgb.DMatrix(x_test)) > 0.5
    return round(float((predicted == y_test.astype(bool)).mean()), 4)


def gpu_for(lease: dict[str, Any]) -> tuple[str, str | None]:
    """The device XGBoost should train on under this lease, and why not the GPU if not."""
    if lease.get("simulated"):
        return "cpu", "the leased GPU is simulated (no CUDA device behind it): trained on the CPU"
    if not xgb.build_info().get("USE_CUDA"):
        return "cpu", "this xgboost was built without CUDA: trained on the CPU"
    # In-process, name the GPU by its index: CUDA_VISIBLE_DEVICES only works if set before
    # CUDA starts, and a service may have started it long ago. (A child process would get
    # CUDA_VISIBLE_DEVICES=lease["cuda_visible_devices"] and use cuda:0, as gpulane exec does.)
    return f"cuda:{lease['device']}", None


def train(params: dict[str, Any] | None = None, *, gpulane_url: str | None = None,
          rounds: int = 50, wait_s: float = 30.0, vram: str | int = "2GiB",
          priority: str | int = "background", holder: str = "ml-service",
          grace_s: float = 10.0, data: Data | None = None) -> dict[str, Any]:
    """Train one model, on a leased GPU when gpulane grants one in time, else on the CPU."""
    params = {**DEFAULT_PARAMS, **(params or {})}
    data = data if data is not None else make_dataset()
    started = time.perf_counter()
    report: dict[str, Any] = {"device": "cpu", "trained_on": "cpu", "reason": "",
                              "note": None, "lease_id": None}
    booster: xgb.Booster | None = None
    try:
        with Client(gpulane_url, timeout=CLIENT_TIMEOUT, retry=CLIENT_RETRY) as client, \
                client.gpu(vram=vram, priority=priority, holder=holder, wait_s=wait_s,
                           grace_s=grace_s) as lease:
            device, note = gpu_for(lease.lease)
            report.update(device=f"cuda:{lease.lease['device']}", trained_on=device,
                          reason="lease granted", note=note, lease_id=lease.lease["id"])
            # Stops early if the lease is preempted; leaving the block then releases the
            # lease and raises LeasePreempted.
            booster, fell_back = fit(data, params, rounds, device,
                                     should_stop=lambda: lease.preempted)
            if fell_back:
                report.update(trained_on="cpu", note=fell_back)
        # The block has ended: the lease is released.
    except TransportError as exc:  # no answer at all (CircuitOpenError: not even tried)
        report["reason"] = f"gpulane unreachable: {exc}"
    except LeasePreempted as exc:
        report["reason"] = f"lease preempted: {exc}"
    except APIError as exc:
        if exc.status == 408:  # lease_wait_timeout: every GPU stayed busy for wait_s
            report["reason"] = f"lease wait timed out: {exc.message}"
        elif exc.status >= 500:  # gpulane answered, but failed: the CPU it is
            report["reason"] = f"gpulane error: {exc}"
        else:
            raise  # gpulane refused the request itself (e.g. more VRAM than any GPU has)

    done = booster.num_boosted_rounds() if booster is not None else 0
    if done < rounds:  # no lease, or it was taken away part way: the CPU does the rest
        booster, _ = fit(data, params, rounds - done, "cpu", start=booster)
        if done and report["trained_on"] != "cpu":
            report["trained_on"] = f"{report['trained_on']}, then cpu"
    report.update(rounds=booster.num_boosted_rounds(), accuracy=accuracy(booster, data),
                  seconds=round(time.perf_counter() - started, 3))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train XGBoost on a GPU leased from gpulane, "
                                     "or on the CPU when none can be had.")
    parser.add_argument("--url", default=None,
                        help="gpulane's URL [GPULANE_URL, else http://127.0.0.1:8765]")
    parser.add_argument("--rounds", type=int, default=50, help="boosting rounds [50]")
    parser.add_argument("--wait-s", type=float, default=30.0,
                        help="how long to wait for a GPU before training on the CPU [30]")
    parser.add_argument("--vram", default="2GiB", help="VRAM to lease [2GiB]")
    parser.add_argument("--priority", default="background",
                        help="immediate, normal, background or 0-100 [background]")
    parser.add_argument("--rows", type=int, default=20_000, help="synthetic rows [20000]")
    args = parser.parse_args(argv)
    priority: str | int = int(args.priority) if args.priority.isdigit() else args.priority
    report = train(gpulane_url=args.url, rounds=args.rounds, wait_s=args.wait_s,
                   vram=args.vram, priority=priority, data=make_dataset(args.rows))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
