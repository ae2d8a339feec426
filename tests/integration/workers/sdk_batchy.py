"""A batching test worker on the worker SDK (which pipelines): input.ms sleeps once per batch;
each task's output is the size of the batch it came in."""

import time

from gpulane.worker import serve


def handle(inputs, ctx):
    time.sleep(max(i.get("ms", 0) for i in inputs) / 1000)
    return [{"batch_size": len(inputs)} for _ in inputs]


serve(load=None, handle=handle, batch=True)
