"""Breakers and retry budgets shared per base URL across all of a process's clients."""

from __future__ import annotations

import threading

from gpulane.client.resilience.breaker import BreakerConfig, CircuitBreaker
from gpulane.client.resilience.budget import BudgetConfig, RetryBudget


class Registry:
    """Breakers and budgets shared per base URL (and configuration) across a process's clients,
    so that many clients to one dead host open together and share one retry budget."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._breakers: dict[tuple[str, BreakerConfig], CircuitBreaker] = {}
        self._budgets: dict[tuple[str, BudgetConfig], RetryBudget] = {}

    def breaker(self, url: str, config: BreakerConfig | None = None) -> CircuitBreaker:
        key = (url, config or BreakerConfig())
        with self._lock:
            found = self._breakers.get(key)
            if found is None:
                found = self._breakers[key] = CircuitBreaker(url, key[1])
            return found

    def budget(self, url: str, config: BudgetConfig | None = None) -> RetryBudget:
        key = (url, config or BudgetConfig())
        with self._lock:
            found = self._budgets.get(key)
            if found is None:
                found = self._budgets[key] = RetryBudget(key[1])
            return found

    def clear(self) -> None:
        with self._lock:
            self._breakers.clear()
            self._budgets.clear()


REGISTRY = Registry()
"""The one registry of this process: clients of one URL find each other here."""


def shared_breaker(url: str, config: BreakerConfig | None = None) -> CircuitBreaker:
    """The process-wide breaker of a base URL (what every client of that URL uses)."""
    return REGISTRY.breaker(url.rstrip("/"), config)
