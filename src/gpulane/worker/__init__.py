"""Write a gpulane worker in a few lines: ``serve(load=..., handle=...)`` speaks the protocol.

```python
from gpulane.worker import serve

def load(ctx):                      # once per worker; ctx.device is "cuda:0" or "cpu"
    return SentenceTransformer(path, device=ctx.device)

def handle(inputs, ctx):            # batch=True: a list of inputs, one output per input
    return [{"vector": v} for v in ctx.model.encode([i["text"] for i in inputs]).tolist()]

serve(load=load, handle=handle, batch=True)
```

The SDK reads the environment the node sets (docs/protocol.md), announces the worker, calls
``load`` once, then serves ``run`` ops (session) or the one input of a one-off, and ends every
task with exactly one ``finish``. An output that is an exception, or an exception ``handle``
raises, fails the task(s) with a kind (:func:`error_kind`). Anything printed to stdout goes to
stderr: stdout carries the protocol only. It needs no third-party package (torch is imported
only to check CUDA when the worker was placed on a GPU, onnxruntime only when a worker calls
``ctx.onnx_providers()`` or ``ctx.onnx_session()``). See docs/workers.md.
"""

from gpulane.worker._context import ENV_SIMULATED, Context, TaskError, error_kind
from gpulane.worker._serve import serve

__all__ = ["ENV_SIMULATED", "Context", "TaskError", "error_kind", "serve"]
