"""bench/routing.py's bad-input case in every test run: against a real ``gpulane serve`` with
allowed roots and a small upload limit, a path out of the roots (``../``, absolute, a symlink),
an upload over the limit (declared and streamed) and an unknown content type are each a 4xx
naming the field, and neither a task nor a file is stored. The bench's other cases are timed,
so they stay in ``make bench-routing``."""

from __future__ import annotations

from pathlib import Path

from bench._util import Procs
from bench.routing import BAD_CASES, case_bad_input


def test_bad_input_is_refused_naming_the_field_and_stores_nothing(tmp_path: Path) -> None:
    with Procs() as procs:
        figures = case_bad_input(procs, tmp_path)
    assert [r["case"] for r in figures["requests"]] == [c[0] for c in BAD_CASES]
    assert all(r["ok"] for r in figures["requests"]), figures["requests"]
    assert figures["stored"]["nothing_stored"], figures["stored"]
    assert figures["stored"]["files_before"] == 2, figures["stored"]  # the good upload's
    assert figures["met"]
