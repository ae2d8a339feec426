"""Preemption plans: which lower-priority holders an urgent lease pauses, device by device.

Pure functions over the ledger's accounts, kept apart from the lease table (leases.py) that
acts on them: a plan per device, then the cheapest set of devices.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

from gpulane.scheduling.ledger import GpuAccount, Holding


def plan_device(acct: GpuAccount, *, vram_mb: int, gpus: int,
                priority: int) -> list[Holding] | None:
    """The holders to pause so that one device can take a request (``vram_mb`` of it, or
    the whole device when ``gpus``) at ``priority``; None if it cannot.

    A slice needs vram_mb free: the lowest-priority preemptible holders below the request's
    priority go first (workers before leases among equals) until it fits. A whole device
    needs every holder gone, so each must be preemptible and of lower priority.
    """
    held = list(acct.holdings.values())
    victims = sorted((h for h in held if h.preemptible and h.priority < priority),
                     key=lambda h: (h.priority, h.kind == "lease"))
    if gpus:
        if len(victims) < len(held) or acct.total_vram_mb <= 0:
            return None
        if acct.free_mb + sum(h.vram_mb for h in held) < acct.total_vram_mb - acct.slack_mb:
            return None  # used outside gpulane too: pausing its holders would not clear it
        return victims
    free, chosen = acct.free_mb, []
    for h in victims:
        if free >= vram_mb:
            break
        chosen.append(h)
        free += h.vram_mb
    return chosen if free >= vram_mb else None


CHEAPEST_EXACT_MAX = 20_000
"""Most device sets cheapest() compares one by one; beyond it, it chooses greedily."""


def cheapest(plans: dict[int, list[Holding]],
              count: int) -> tuple[list[int], list[Holding]] | None:
    """The ``count`` devices whose plans together pause the cheapest set of holders."""
    if len(plans) < count:
        return None

    def cost(devices: Iterable[int]) -> tuple[tuple[int, int], dict[str, Holding]]:
        union = {h.holder: h for d in devices for h in plans[d]}
        return (sum(h.priority for h in union.values()), len(union)), union

    candidates = sorted(plans)
    if math.comb(len(candidates), count) <= CHEAPEST_EXACT_MAX:
        combos = itertools.combinations(candidates, count)  # in lowest-index-first order
        best = min(combos, key=lambda ds: cost(ds)[0])
    else:  # a very large node: add the device that adds the least cost, one at a time
        best_list: list[int] = []
        for _ in range(count):
            rest = [d for d in candidates if d not in best_list]
            best_list.append(min(rest, key=lambda d: cost([*best_list, d])[0]))
        best = tuple(sorted(best_list))
    return list(best), list(cost(best)[1].values())
