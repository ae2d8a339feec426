"""The gpulane SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both retry transient errors under a retry budget, guard each base URL with a circuit breaker
shared across the process, and can serve ``run`` from a local fallback when the server cannot
be reached; see :mod:`gpulane.client.resilience` and ``stats()``.
"""

from gpulane.client._coalesce_async import AsyncTaskFuture
from gpulane.client.async_client import AsyncClient
from gpulane.client.client import Client
from gpulane.client.resilience import (
    BreakerConfig,
    BudgetConfig,
    CircuitBreaker,
    RetryBudget,
    RetryPolicy,
    shared_breaker,
)

__all__ = ["AsyncClient", "AsyncTaskFuture", "BreakerConfig", "BudgetConfig", "CircuitBreaker",
           "Client", "RetryBudget", "RetryPolicy", "shared_breaker"]
