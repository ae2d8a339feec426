"""``python -m gpulane.cli``: the same as the ``gpulane`` command (as when cli was a module)."""

from gpulane.cli import main

main()
