"""How a worker's argv is wrapped so that the worker dies with its node.

A node that crashes (or is killed -9) must not leave workers holding GPU memory. Linux's
PR_SET_PDEATHSIG does that, but it has to be armed in the child, and arming it from
``preexec_fn`` is unsafe while the node runs other threads (the child may deadlock on a lock
one of them held at fork). So the child arms it itself, after the fork, by exec'ing through:

1. ``setpriv --pdeathsig KILL -- ARGV`` (util-linux) when setpriv has that option; else
2. ``python -I die_with_parent.py NODE_PID -- ARGV``, a shim that arms it with prctl, checks
   the node is still its parent (it may have died before the signal was armed) and execs.

Either way the worker keeps the pid the node spawned (exec, not a child), so killing its
process group still kills it, and it runs in its own session (``start_new_session``), apart
from the node's terminal signals. setpriv leaves the tiny race that the shim closes (the node
dies between the fork and the prctl); a session worker still exits when its stdin closes then.
Elsewhere than Linux the argv is left as it is.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

SHIM = Path(__file__).with_name("die_with_parent.py")
"""The exec shim used when setpriv cannot arm the signal."""
SETPRIV_PROBE_TIMEOUT_S = 5.0
"""How long ``setpriv --help`` may take when the node first asks what it supports."""


@functools.cache
def setpriv_path() -> str | None:
    """setpriv's path when it has ``--pdeathsig`` (util-linux 2.33+), else None."""
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        probe = subprocess.run([path, "--help"], capture_output=True, text=True,
                               timeout=SETPRIV_PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "--pdeathsig" in probe.stdout + probe.stderr else None


def die_with_parent(argv: list[str], *, use_setpriv: bool = True) -> list[str]:
    """``argv`` wrapped so that the process it starts is killed when this process dies."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    setpriv = setpriv_path() if use_setpriv else None
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "KILL", "--", *argv]
    return [sys.executable, "-I", str(SHIM), str(os.getpid()), "--", *argv]
