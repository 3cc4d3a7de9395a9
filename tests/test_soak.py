"""The chaos soak (bench/soak.py), 60 seconds: three nodes on one Redis (AOF everysec),
devices reconnecting at random with ``since``/``resume``, steady senders; kill -9 of a
node and its restart, a Redis restart, a node SIGSTOPped for 10 s.  Every acked message
must reach every device of its recipient exactly once after de-duplication by msg_id,
in seq order; presence watchers and the cluster-wide gauge must be right at the end.

Skipped only when redis-server is missing and TIDINGS_REQUIRE_ALL is unset.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from redis_fixture import redis_binary, require_coredis

require_coredis()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import soak  # noqa: E402  (bench/soak.py)


@pytest.mark.timeout(240)
async def test_chaos_soak_loses_nothing(tmp_path):
    redis_binary()  # skip (or fail under TIDINGS_REQUIRE_ALL=1) without redis-server
    settings = soak.Settings(duration=60, users=30, rate=30, nodes=3, ttl=3.0, settle=45,
                             seed=11, workdir=tmp_path)
    r = await soak.run(settings)
    print({k: v for k, v in r.items() if k != "settings"})
    done = [what for _, what in r["faults"]]
    for fault in ("kill -9 n1", "n1 started again", "redis SIGTERM", "redis started again",
                  "SIGSTOP n2", "SIGCONT n2"):
        assert fault in done, (fault, r["faults"])
    assert r["crash_lines"] == []
    assert r["acked"] >= 0.6 * r["sent"] > 0, r["counts"]  # the faults cost some, not most
    assert r["counts"].get("send refused: unavailable", 0) > 0  # Redis was really down
    assert r["lost"] == 0, (r["lost_examples"], r["devices_behind"])
    assert r["delivered"] == r["deliveries_expected"]
    assert r["order_violations"] == 0, r["violation_examples"]
    assert r["incomplete_replays"] == 0
    assert r["watched_wrongly_offline"] == [], r["counts"]
    assert r["cluster_users_online"] == [31.0] * 3  # 30 users and the observer
