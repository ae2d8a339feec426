"""A batching test worker: answers each task with the size of the batch it came in.

BATCHY_OOM_ABOVE=N fails every task of a batch larger than N (0: every batch) with kind
``oom``, as a model that ran out of device memory would. input.ms sleeps that long once per batch.
A task whose input has ``crash: true`` kills the worker (a poison input: a segfault in the
model), whatever batch it is in; ``progress: true`` streams a progress event for the task first.
"""

import os
import sys
import time

from session_loop import serve

OOM_ABOVE = int(os.environ.get("BATCHY_OOM_ABOVE") or -1)


def run_batch(tasks):
    n = len(tasks)
    if any((t["input"] or {}).get("crash") for t in tasks):
        sys.stderr.write(f"Fatal Python error: Segmentation fault (batch of {n})\n")
        sys.stderr.flush()
        os._exit(139)
    lines = [{"event": "progress", "task": t["task"], "done": 0, "total": 1}
             for t in tasks if (t["input"] or {}).get("progress")]
    if OOM_ABOVE >= 0 and n > OOM_ABOVE:
        for t in tasks:
            lines.append({"event": "finish", "task": t["task"], "status": "failed",
                          "error": {"kind": "oom", "message": "CUDA out of memory"}})
    else:
        time.sleep(max((t["input"] or {}).get("ms", 0) for t in tasks) / 1000)
        for t in tasks:
            lines.append({"event": "result", "task": t["task"],
                          "output": {"batch_size": n}})
            lines.append({"event": "finish", "task": t["task"], "status": "completed"})
    return lines


def main():
    serve(run_batch)


if __name__ == "__main__":
    main()
