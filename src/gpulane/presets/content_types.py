"""Content types and the patterns that match them: a preset's ``accepts`` and the registry's
``routes:`` (content type -> preset).

A pattern is ``type/subtype``, ``type/*`` or ``*/*``. Matching lower-cases the content type and
drops its parameters (``image/PNG; q=1`` is ``image/png``); among routes the most specific
pattern wins: an exact type before ``type/*`` before ``*/*``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

_TOKEN = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"
_PATTERN_RE = re.compile(rf"(?:{_TOKEN}/(?:{_TOKEN}|\*)|\*/\*)")
PATTERN_FORMS = "type/subtype, type/* or */*, e.g. image/png or image/*"
"""The spellings of a content-type pattern that errors offer as the fix."""


def normalize(content_type: str) -> str:
    """``image/PNG; q=1`` as ``image/png``: lower-cased, parameters dropped, trimmed."""
    return content_type.split(";", 1)[0].strip().lower()


def is_pattern(text: str) -> bool:
    """Whether ``text`` (normalized) is ``type/subtype``, ``type/*`` or ``*/*``."""
    return _PATTERN_RE.fullmatch(text) is not None


def specificity(pattern: str) -> int:
    """2 for an exact type, 1 for ``type/*``, 0 for ``*/*``."""
    return 0 if pattern == "*/*" else 1 if pattern.endswith("/*") else 2


def matches(pattern: str, content_type: str) -> bool:
    """Whether ``pattern`` matches the (normalized) ``content_type``."""
    pattern = normalize(pattern)
    if pattern == "*/*":
        return True
    if pattern.endswith("/*"):
        return content_type.split("/", 1)[0] == pattern[:-2] and "/" in content_type
    return pattern == content_type


def accepted(accepts: Iterable[str], content_type: str) -> bool:
    """Whether any of ``accepts`` matches ``content_type`` (given as the caller wrote it)."""
    ct = normalize(content_type)
    return any(matches(a, ct) for a in accepts)


def covers(accepts: Iterable[str], pattern: str) -> bool:
    """Whether everything ``pattern`` matches is accepted by one of ``accepts``: what a route
    to a preset needs (``image/*`` is covered by ``image/*`` or ``*/*``, not ``image/png``)."""
    pattern = normalize(pattern)
    for a in map(normalize, accepts):
        if a == "*/*" or a == pattern:
            return True
        if a.endswith("/*") and pattern != "*/*" and pattern.split("/", 1)[0] == a[:-2]:
            return True
    return False


@dataclass(frozen=True, slots=True)
class ContentRoute:
    """One entry of ``routes:``: a normalized pattern, the preset it names, and where it was
    written (file and line; empty for a route made in code)."""

    content_type: str
    preset: str
    file: str = ""
    line: int = 0

    @property
    def source(self) -> str:
        """``FILE:LINE`` as load errors show it."""
        return f"{self.file}:{self.line}"


class RouteTable:
    """The registry's routes, most specific first; ``match`` picks the preset for a type."""

    def __init__(self, routes: Iterable[ContentRoute] | Mapping[str, str] = ()) -> None:
        items = ([ContentRoute(normalize(k), v) for k, v in routes.items()]
                 if isinstance(routes, Mapping) else list(routes))
        # Most specific first, then by pattern so that the listing is stable.
        self._routes = sorted(items, key=lambda r: (-specificity(r.content_type),
                                                    r.content_type))

    def match(self, content_type: str) -> str | None:
        """The preset for ``content_type`` (any spelling), or None when no route matches."""
        ct = normalize(content_type)
        for r in self._routes:
            if matches(r.content_type, ct):
                return r.preset
        return None

    def patterns(self) -> list[str]:
        return [r.content_type for r in self._routes]

    def view(self) -> list[dict[str, str]]:
        """``[{"content_type", "preset"}, ...]``, most specific first (GET /v1/routes)."""
        return [{"content_type": r.content_type, "preset": r.preset} for r in self._routes]

    def __iter__(self) -> Iterator[ContentRoute]:
        return iter(self._routes)

    def __len__(self) -> int:
        return len(self._routes)

    def __repr__(self) -> str:
        return f"RouteTable({self.view()!r})"
