"""Run a command so that it dies with the node: an exec shim that arms PR_SET_PDEATHSIG.

Used when ``setpriv --pdeathsig`` is not available (see runtime/spawn.py). It is run by path
with this interpreter (``python -I die_with_parent.py NODE_PID -- ARGV...``), imports only the
standard library, and replaces itself with the worker: the signal, once armed, survives the
exec. A node that died before the signal was armed (the fork happened, the node was killed,
then prctl ran) would leave the worker orphaned for good, so the shim checks that its parent
is still the node after arming it, and exits instead of starting the worker.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
"""prctl option: the signal this process gets when the thread that forked it exits."""
EXIT_ORPHANED = 125
"""Exit status when the node was already gone: nothing was started."""
EXIT_USAGE = 126
"""Exit status for a malformed command line (the node built it: a bug)."""


def main(args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--" or not args[0].isdigit():
        sys.stderr.write("usage: die_with_parent.py NODE_PID -- COMMAND [ARG...]\n")
        return EXIT_USAGE
    node_pid, argv = int(args[0]), args[2:]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # no prctl here: a session worker still exits when its stdin closes
    if os.getppid() != node_pid:
        sys.stderr.write(f"the node (pid {node_pid}) exited before the worker started\n")
        return EXIT_ORPHANED
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"cannot start {argv[0]!r}: {exc}\n")
        return 127
    return 0  # not reached: execvp returns only by raising


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
