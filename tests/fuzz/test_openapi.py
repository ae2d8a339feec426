"""Schemathesis against the published OpenAPI document: the API keeps the contract it states.

Every operation gets schemathesis's examples, coverage (boundary values, every wrong method)
and fuzzing phases, valid and invalid data alike, against the in-process app on a node with
simulated GPUs: no server error, no status code the document does not list, every response
matching its schema and content type, and every wrong method a 405 with an ``Allow`` header.
It runs twice, over 1,000 cases each: on an open node, and on a node with API keys where
every case carries an admin key (so the guard and the routes behind it meet the same input).
Hypothesis runs derandomized, so CI sees the same cases each run.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import schemathesis
from schemathesis.engine import events
from schemathesis.python.asgi import shutdown_lifespans

from gpulane.api.app import create_app
from gpulane.node import Node
from tests.integration.conftest import make_settings

CHECKS = ["not_a_server_error", "status_code_conformance", "response_schema_conformance",
          "content_type_conformance", "unsupported_method", "allow_header_conformance"]
MAX_EXAMPLES = 60
"""Per operation and phase: about 1,200 cases a run, some 10 s here."""
MIN_CASES = 1000
"""The issue's floor per run; fewer would also mean operations went untested."""
FUZZ_KEY = "glk_fuzz-admin-key"
"""The admin key of the keyed run (settings ``keys``: name:secret:scopes)."""
WAIT_BOUND_S = 0.05
"""Longest a generated ``wait`` may hold a request (the document allows 300 s)."""


def narrowed(document: dict[str, Any]) -> dict[str, Any]:
    """The published document, with what would block a run for minutes taken out.

    - Event streams (``.../events``) stay open until their task or lease ends, minutes for a
      generated one, and the status stream (``/v1/status/stream``) until its client leaves,
      so they are left out; tests/integration covers them.
    - ``wait`` (submit, result) and a lease's ``wait_s`` are bounded: a generated long-poll
      or lease wait would hold its request for up to 300 s or an hour.
    """
    doc = copy.deepcopy(document)
    doc["paths"] = {p: item for p, item in doc["paths"].items()
                    if not p.endswith(("/events", "/stream"))}
    for item in doc["paths"].values():
        for operation in item.values():
            for param in operation.get("parameters", []):
                if param["name"] == "wait":
                    for branch in param["schema"]["anyOf"]:
                        if branch.get("type") == "number":
                            branch["maximum"] = WAIT_BOUND_S
    wait_s = doc["components"]["schemas"]["LeaseBody"]["properties"]["wait_s"]
    for branch in wait_s["anyOf"]:
        branch["maximum"] = 0
    return doc


def run(schema: Any) -> tuple[int, list[str], Counter[int]]:
    """Run every phase; the number of cases, each failed check as text, and the statuses."""
    cases, failures, statuses = 0, [], Counter[int]()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            cases += len(event.recorder.cases)
            statuses.update(i.response.status_code for i in event.recorder.interactions.values()
                            if i.response is not None)
            for checks in event.recorder.checks.values():
                failures.extend(
                    f"{event.recorder.label}: {c.name}: {c.failure_info.failure.title}: "
                    f"{c.failure_info.failure.message}"
                    for c in checks if c.failure_info is not None)
        elif isinstance(event, events.NonFatalError | events.FatalError):
            failures.append(f"{type(event).__name__}: {event}")
    return cases, failures, statuses


def fuzz(tmp_path: Path, headers: dict[str, str] | None = None,
         **settings: Any) -> tuple[int, list[str], Counter[int]]:
    """Every phase against the app of a node with these settings: what :func:`run` answers."""
    node = Node(make_settings(tmp_path, **settings))
    app = create_app(node)  # schemathesis runs the app's lifespan: it starts and stops the node
    schema = schemathesis.openapi.from_dict(narrowed(app.openapi()))
    schema.app = app
    schema.config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True,
                                    modes=["positive", "negative"])
    schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])
    schema.config.checks.update(included_check_names=CHECKS)
    if headers:
        schema.config.update(headers=headers)
    try:
        return run(schema)
    finally:
        shutdown_lifespans()


def test_the_api_keeps_its_published_contract(tmp_path: Path) -> None:
    cases, failures, _ = fuzz(tmp_path)
    assert not failures, "\n".join(failures[:20])
    assert cases >= MIN_CASES, cases


def test_the_contract_holds_behind_api_keys(tmp_path: Path) -> None:
    cases, failures, statuses = fuzz(tmp_path, {"Authorization": f"Bearer {FUZZ_KEY}"},
                                     keys=f"fuzz:{FUZZ_KEY}:admin")
    assert not failures, "\n".join(failures[:20])
    assert cases >= MIN_CASES, cases
    # The key was taken: the cases reached the routes, not only the guard's 401.
    assert statuses[401] < cases // 10 and statuses[200] + statuses[202] > 0, statuses
