"""The session protocol's loop that the batch test workers share: say ready, then answer each
``run`` op with the lines a worker's batch function returns, until ``shutdown``."""

import json
import sys


def serve(run_batch):
    """Answer every ``run`` op on stdin with ``run_batch(tasks)``'s event dicts, written (and
    flushed) together after the batch, as a model that runs a batch at once would."""
    out = sys.stdout
    out.write(json.dumps({"event": "worker", "status": "ready"}) + "\n")
    out.flush()
    for line in sys.stdin:
        op = json.loads(line)
        if op["op"] == "shutdown":
            return
        if op["op"] != "run":
            continue
        lines = run_batch(op["tasks"])
        out.write("".join(json.dumps(x) + "\n" for x in lines))
        out.flush()
