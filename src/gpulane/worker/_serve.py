"""``serve(load=..., handle=...)``: run this process as a gpulane worker (the SDK's one entry).

The public names live in :mod:`gpulane.worker`, whose docstring shows a whole worker.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

from gpulane.worker._context import Context
from gpulane.worker._server import Server


def serve(load: Callable[[Context], Any] | None = None, handle: Callable[..., Any] | None = None,
          *, batch: bool = True) -> None:
    """Run this process as a gpulane worker until ``shutdown`` (session) or its one task ends.

    - ``load(ctx)`` runs once; what it returns is ``ctx.model``. If it raises, the traceback
      goes to stderr, a ``worker`` ``failed`` event to stdout, and the process exits with 1.
    - ``batch=True``: ``handle(inputs, ctx)`` gets a list of inputs (one ``run`` op) and
      returns a list with one output per input.
    - ``batch=False``: ``handle(input, ctx)`` runs once per task and returns its output, or is
      a generator: yielded str are streamed as ``text_delta`` (the output is the joined text),
      yielded dicts are emitted as that task's events (``progress`` unless they name another
      ``event``), and a returned value becomes the output.
    - An output that is an exception fails that task; an exception ``handle`` raises fails
      every task it was given. The kind comes from :func:`error_kind`.
    """
    if handle is None:
        raise TypeError("serve() needs handle=")
    if batch and inspect.isgeneratorfunction(handle):
        raise TypeError("a generator handler streams one task at a time: use batch=False")
    server = Server(load, handle, batch, dict(os.environ))
    try:
        code = server.run()
    except BrokenPipeError:  # the node went away
        code = 0
    if code:
        raise SystemExit(code)
