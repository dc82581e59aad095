"""Prometheus /metrics: a collector that reads the store's counters at scrape time.

Every series is node-wide or per tier (the only label is `tier`: gpu, cpu, disk, s3): no namespace,
tenant, key or block hash appears here. The endpoint has no authentication, so it listens on
loopback unless metrics.allow_remote says otherwise.

The store is event-loop-only state, so a scrape (on the HTTP server's thread) asks the loop for a
snapshot and waits for it (bounded): a consistent view, never a read of state being changed.
Nothing here is on the request path.
"""

from __future__ import annotations

import asyncio
import dataclasses

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .config import MetricsConfig
from .stats import stats_response


SCRAPE_TIMEOUT_S = 5.0


class StoreCollector:
    def __init__(self, store, loop: asyncio.AbstractEventLoop | None = None):
        self.store = store
        self.loop = loop

    def collect(self):
        if self.loop is None:  # the caller is on the loop's thread (tests)
            return list(self._families())

        async def snapshot():
            return list(self._families())
        return asyncio.run_coroutine_threadsafe(snapshot(), self.loop).result(SCRAPE_TIMEOUT_S)

    def _families(self):
        store = self.store
        for name, value in dataclasses.asdict(store.counters).items():
            yield CounterMetricFamily(f"kvtier_{name}", f"kvtier {name.replace('_', ' ')}", value=value)
        gauges = {"blocks": store.catalog.blocks, "bytes": store.catalog.bytes,
                  "write_backlog": store.backlog, "active_leases": len(store.leases),
                  "active_allocations": len(store.allocations), "event_seq": store.events.seq,
                  "watchers": store.events.watchers, "healthy": int(store.problem() is None)}
        if store.sessions is not None:  # local sessions (engine processes) and refusals (unknown uids, full)
            gauges["local_sessions"] = len(store.sessions)
            yield CounterMetricFamily("kvtier_local_sessions_refused", "kvtier local sessions refused",
                                      value=store.sessions.refused)
        if store.s3sync is not None:  # the outage signal: obligations waiting, and whether S3 answers
            gauges["upload_backlog"] = store.s3sync.backlog
            gauges["s3_reachable"] = int(store.s3sync.reachable)
            gauges["s3_conditional_puts"] = int(store.s3sync.conditional_puts)  # 0: no cross-node dedup
            for name, value in dataclasses.asdict(store.s3sync.counters).items():
                yield CounterMetricFamily(f"kvtier_s3_{name}", f"kvtier s3 {name.replace('_', ' ')}", value=value)
        if store.peers is not None:
            for name, value in dataclasses.asdict(store.peers.counters).items():
                yield CounterMetricFamily(f"kvtier_peer_{name}", f"kvtier peer {name.replace('_', ' ')}", value=value)
            gauges["peer_transport_nixl"] = int(store.peers.transport is not None)  # 0: the gRPC fallback
            gauges["peer_withheld_slots"] = store.peers.withheld_slots
        service = getattr(store, "peer_service", None)  # the owner side (peers.listen): what it served and refused
        if service is not None:
            for name, value in dataclasses.asdict(service.counters).items():
                yield CounterMetricFamily(f"kvtier_peer_{name}", f"kvtier peer {name.replace('_', ' ')}", value=value)
        if store.disk is not None:  # protected blocks copied forward instead of evicted
            yield CounterMetricFamily("kvtier_disk_compacted_blocks", "kvtier disk blocks copied forward by compaction",
                                      value=store.disk.compacted_blocks)
        for name, value in gauges.items():
            yield GaugeMetricFamily(f"kvtier_{name}", f"kvtier {name.replace('_', ' ')}", value=value)
        tier_blocks = GaugeMetricFamily("kvtier_tier_blocks", "blocks held per tier", labels=["tier"])
        tier_bytes = GaugeMetricFamily("kvtier_tier_bytes", "bytes held per tier", labels=["tier"])
        tier_capacity = GaugeMetricFamily("kvtier_tier_capacity_bytes", "capacity per tier", labels=["tier"])
        evictions = CounterMetricFamily("kvtier_tier_evictions", "blocks evicted per tier", labels=["tier"])
        pressure = CounterMetricFamily("kvtier_tier_pressure_evictions",
                                       "TTL-pinned blocks evicted because nothing else could go", labels=["tier"])
        for tier in stats_response(store).tiers:
            tier_blocks.add_metric([tier.tier], tier.blocks)
            tier_bytes.add_metric([tier.tier], tier.bytes)
            tier_capacity.add_metric([tier.tier], tier.capacity_bytes)
            evictions.add_metric([tier.tier], tier.evictions)
            pressure.add_metric([tier.tier], tier.pressure_evictions)
        yield from (tier_blocks, tier_bytes, tier_capacity, evictions, pressure)


def serve_metrics(store, listen: str, allow_remote: bool = False):
    """Starts the /metrics HTTP endpoint on host:port (an empty host is 127.0.0.1); returns (server,
    thread). Call from the loop. Anyone who reaches it reads every series above without
    authentication, so a host beyond loopback needs `allow_remote` (metrics.allow_remote; config
    validation refuses it first, this is the second line)."""
    host, _, port = listen.rpartition(":")
    if not allow_remote and not MetricsConfig.loopback(host):
        raise ValueError(f"metrics.listen {listen!r} is beyond loopback and metrics.allow_remote is false")
    registry = CollectorRegistry()
    registry.register(StoreCollector(store, asyncio.get_running_loop()))
    return start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry)
