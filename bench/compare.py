"""Before and after: bench/dispatch.py on two versions of gpulane, interleaved, in one sitting.

    .venv/bin/python bench/compare.py --before REV [--after REV] [--rounds 4]
                                      [--out bench/results/compare-dispatch.json]
                                      [-- ARGS FOR bench/dispatch.py]

A refactor promises "no slower"; this checks it the only way that means anything on a shared
VM: both versions measured in the same sitting, taking turns (the order flips each round, so
a drift of the machine weighs on both alike), each several times, compared by the median.

``--before`` is a git revision, checked out as a temporary worktree. ``--after`` is another
revision, or by default this working tree as it is (uncommitted changes included). Each side
runs its own ``bench/dispatch.py`` with its own ``src`` first on ``PYTHONPATH``, so server and
SDK are both the version under test, as its users would get them. The table gives each
gpulane figure's median per side and after/before; the JSON keeps every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import REPO, print_table, run_record, stop_on_signals, write_json

THROUGHPUT = ("results", "gpulane", "throughput")
FIGURES: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "bulk+list tasks/s": lambda d: _dig(d, (*THROUGHPUT, "bulk+list", "tasks_per_s")),
    "bulk+list CPU us/task": lambda d: _cpu_per_task(d, "bulk+list"),
    "bulk+longpoll tasks/s": lambda d: _dig(d, (*THROUGHPUT, "bulk+longpoll", "tasks_per_s")),
    "bulk+longpoll CPU us/task": lambda d: _cpu_per_task(d, "bulk+longpoll"),
    "round trip p50 ms": lambda d: _dig(d, ("results", "gpulane", "round_trip", "p50_ms")),
    "round trip p99 ms": lambda d: _dig(d, ("results", "gpulane", "round_trip", "p99_ms")),
    "celery round trip p50 ms": lambda d: _dig(d, ("results", "celery", "round_trip",
                                                   "p50_ms")),
}
"""The figures compared, read from dispatch.py's JSON. CPU per task is every benchmark
process's (client, node, workers) over the tasks: steadier than a rate on a VM whose speed
drifts. Celery's p50 is context: it tells how the machine itself moved between the runs."""
HIGHER_IS_BETTER = frozenset({"bulk+list tasks/s", "bulk+longpoll tasks/s"})


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def _checkout(rev: str, where: Path) -> Path:
    _git("worktree", "add", "--detach", "--force", str(where), rev)
    return where


def _dig(data: dict[str, Any], path: tuple[str, ...]) -> float | None:
    node: Any = data
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) else None


def _cpu_per_task(data: dict[str, Any], method: str) -> float | None:
    cpu_s = _dig(data, (*THROUGHPUT, method, "noise", "bench_cpu_s"))
    count = _dig(data, (*THROUGHPUT, method, "check", "count"))
    return cpu_s / count * 1e6 if cpu_s is not None and count else None


def run_side(tree: Path, out: Path, dispatch_args: list[str]) -> dict[str, Any]:
    """One bench/dispatch.py run of the gpulane in ``tree``; its JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree / "src"), str(tree),
                                                      env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(tree / "bench" / "dispatch.py"), "--out", str(out),
           *dispatch_args]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each figure's median per side, and after over before."""
    out: dict[str, dict[str, Any]] = {}
    for name, read in FIGURES.items():
        row: dict[str, Any] = {}
        for side, datas in runs.items():
            values = [v for v in (read(d) for d in datas) if v is not None]
            row[side] = {"runs": values, "median": statistics.median(values) if values else None}
        before, after = row["before"]["median"], row["after"]["median"]
        row["after_over_before"] = after / before if before and after is not None else None
        row["higher_is_better"] = name in HIGHER_IS_BETTER
        out[name] = row
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--before", required=True, help="git revision measured as 'before'")
    p.add_argument("--after", default=None,
                   help="git revision measured as 'after' (default: this working tree)")
    p.add_argument("--rounds", type=int, default=4, help="runs of each side, taking turns")
    p.add_argument("--out", type=Path,
                   default=REPO / "bench" / "results" / "compare-dispatch.json")
    p.add_argument("dispatch_args", nargs=argparse.REMAINDER,
                   help="after --: arguments for bench/dispatch.py")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.dispatch_args[:1] == ["--"]:
        args.dispatch_args = args.dispatch_args[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    started, load_start = time.time(), list(os.getloadavg())
    tmp = Path(tempfile.mkdtemp(prefix="gpulane-compare-"))
    trees: dict[str, Path] = {}
    try:
        trees["before"] = _checkout(args.before, tmp / "before")
        trees["after"] = _checkout(args.after, tmp / "after") if args.after else REPO
        runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
        for i in range(args.rounds):
            order = ("before", "after") if i % 2 == 0 else ("after", "before")
            for side in order:
                print(f"round {i + 1}/{args.rounds}: {side} ...", flush=True)
                runs[side].append(run_side(trees[side], tmp / f"{side}{i}.json",
                                           args.dispatch_args))
    finally:
        for tree in trees.values():
            if tree != REPO:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                                str(tree)], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    figures = summarise(runs)
    rows = [[name, _fmt(f["before"]["median"]), _fmt(f["after"]["median"]),
             f"{f['after_over_before']:.3f}" if f["after_over_before"] else "-"]
            for name, f in figures.items()]
    print()
    print_table(["figure (median)", "before", "after", "after/before"], rows)
    after_rev = args.after or f"working tree at {_git('rev-parse', '--short', 'HEAD')}"
    write_json(args.out, {
        **run_record("compare-dispatch", "bench/compare.py", argv, started, load_start),
        "parameters": {"before": args.before, "after": after_rev, "rounds": args.rounds,
                       "dispatch_args": args.dispatch_args},
        "figures": figures,
        "runs": {side: [{"code": d.get("code"), "machine": d.get("machine"),
                         "headline": d.get("headline"),
                         "noise": {m: r.get("noise") for m, r in d["results"]["gpulane"]
                                   ["throughput"].items()}}
                        for d in datas] for side, datas in runs.items()},
    })
    print(f"\nwrote {args.out}")
    return 0


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
