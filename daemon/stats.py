"""Store state in the wire's words: the Stats answer (read by the service and by /metrics)."""

from __future__ import annotations

import time

from kvtier.proto.v1 import kvtier_pb2 as pb


def stats_response(store) -> pb.StatsResponse:
    """The Stats answer, assembled from the store's counters and tiers (event loop)."""
    c = store.counters
    tiers = []
    if store.gpu is not None:
        g = store.gpu.stats()
        tiers.append(pb.TierStats(tier="gpu", blocks=len(store.gpu), bytes=store.gpu.used_bytes,
                                  capacity_bytes=store.gpu.capacity_bytes, reads=g["reads"],
                                  writes=g["writes"], read_bytes=g["read_bytes"],
                                  write_bytes=g["write_bytes"], evictions=store.gpu.evictions,
                                  pressure_evictions=store.gpu.pressure_evictions))
    tiers += [pb.TierStats(tier="cpu", blocks=len(store.cpu), bytes=store.cpu.used_bytes,
                          capacity_bytes=store.arena.size_bytes, reads=c.cpu_reads, writes=c.cpu_writes,
                          read_bytes=c.cpu_read_bytes, write_bytes=c.cpu_write_bytes,
                          evictions=store.cpu.evictions, pressure_evictions=store.cpu.pressure_evictions)]
    if store.disk is not None:
        tiers.append(pb.TierStats(tier="disk", blocks=store.disk_blocks, bytes=store.disk.used_bytes(),
                                  capacity_bytes=store.disk.capacity_bytes, reads=c.disk_reads,
                                  writes=c.disk_writes, read_bytes=c.disk_read_bytes,
                                  write_bytes=c.disk_write_bytes, evictions=c.disk_evictions))
    if store.s3sync is not None:
        s3 = store.s3sync.counters
        tiers.append(pb.TierStats(tier="s3", blocks=store.s3sync.blocks, reads=s3.downloads, writes=s3.uploads,
                                  read_bytes=s3.download_bytes, write_bytes=s3.upload_bytes))
    return pb.StatsResponse(
        blocks=store.catalog.blocks, bytes=store.catalog.bytes, lookups=c.lookups, lookup_keys=c.lookup_keys,
        lookup_hit_keys=c.lookup_hit_keys, acquire_hits=c.acquire_hits, acquire_misses=c.acquire_misses,
        duplicates=c.duplicates, quarantined=c.quarantined, write_backlog=len(store._pending),
        active_leases=len(store.leases), active_allocations=len(store.allocations), tiers=tiers,
        event_seq=store.events.seq, uptime_s=time.monotonic() - store.started,
        upload_backlog=store.s3sync.backlog if store.s3sync else 0,
        s3_reachable=store.s3sync.reachable if store.s3sync else False)
