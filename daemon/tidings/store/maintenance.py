"""Maintenance shared by the engines (trio): the periodic retention prune."""

from __future__ import annotations

import time

import trio

from tidings import log
from tidings.store.base import Store, StoreLimits
from tidings.store.records import StoreError

__all__ = ["prune_periodically"]


async def prune_periodically(store: Store, limits: StoreLimits) -> None:
    """Every ``limits.prune_interval_s``: ``store.prune`` with the retention.  Failures
    are logged (once per interval) and retried at the next tick; never raises."""
    failures = log.LogOnce(interval=60.0)
    while True:
        await trio.sleep(limits.prune_interval_s)
        try:
            removed = await store.prune(int(time.time() * 1000), limits.retention_days)
        except StoreError as exc:
            failures.log("error", "prune_failed", key="prune", store=store.name, error=str(exc))
            continue
        if removed:
            log.log("info", "pruned", store=store.name, messages=removed)
