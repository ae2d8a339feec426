"""``python -m gpulane``: the same as the ``gpulane`` command."""

from gpulane.cli import main

main()
