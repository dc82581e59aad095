"""Synthetic coding-agent trace and block-level cache simulator for bench/bench_agentic.py.

The trace is what a harness (the agent loop) and an engine would send a per-node KV store, at block
granularity (one block ~ 256 tokens):
  * requests: (time, input blocks in prefix order, output blocks). The engine reads every input block
    from the store (a miss is recomputed and stored) and stores every output block;
  * retention hints: (time, blocks, name): a SetRetention the harness sends for a key range when a
    subagent finishes ("subagent_done": demoted to ephemeral), when the agent gives its final answer
    and waits for the user ("task_done": conversation at priority 20, still pinned 5m), and when the
    user comes back ("task_resume": priority 50 again).
Commit-time retention comes from each block's class (HARNESS_RETENTION): the system prompt with
cache_control 1h, the conversation and a running subagent's context with 5m, decode scratch unpinned.

The simulator models the CPU tier of a store that has a disk tier behind it holding every block:
an input block is a CPU hit, a disk hit (stored before, not in the CPU tier now: a promotion), or a
miss (never stored: compulsory, the same for every policy). Each request is served like the daemon
serves an engine: its hits are looked up and touched (`accessed`), then one reservation makes room
for all its new blocks (misses + outputs) by walking `candidates()` (as SlotTier.reserve does), then
the new blocks are committed with their retention (`retain` + `inserted`). A disk hit is promoted into
the CPU tier like a miss (it is a CPU write too). Only the policy decides what stays.
"""

from __future__ import annotations

import heapq
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kvtier.tiers.eviction import LruPolicy  # noqa: E402
from kvtier.tiers.retention import Retention, RetentionPolicy, parse_cache_control  # noqa: E402

NEVER = float("inf")
HARNESS_RETENTION = {
    # class -> retention at commit (what the harness sends with each Put/Commit)
    "system": Retention("system", 90, parse_cache_control({"type": "ephemeral", "ttl": "1h"})),
    "conversation": Retention("conversation", 50, parse_cache_control({"type": "ephemeral", "ttl": "5m"})),
    "subagent": Retention("subagent", 50, parse_cache_control({"type": "ephemeral", "ttl": "5m"})),
    "decode": Retention("decode", 0, None),
}
HINTS = {
    "subagent_done": Retention("ephemeral", 0, None),
    "task_done": Retention("conversation", 20, parse_cache_control({"type": "ephemeral", "ttl": "5m"})),
    "task_resume": Retention("conversation", 50, parse_cache_control({"type": "ephemeral", "ttl": "5m"})),
}


@dataclass
class TraceParams:
    seed: int = 5
    sessions: int = 48
    agents: int = 3
    span_s: float = 1800.0
    turns: tuple[int, int] = (15, 40)      # agent turns per task
    tasks: tuple[int, int] = (1, 1)        # tasks per session (a user message each)
    think_s: float = 60.0                  # median user think time between tasks (lognormal, <= 15 min)
    system_blocks: int = 64
    subagent_p: float = 0.2                # P(a tool call runs subagents)
    fanout: int = 1                        # subagents started together: 1..fanout


@dataclass
class Trace:
    params: TraceParams
    cls: list[str] = field(default_factory=list)          # block -> class
    session: list[int] = field(default_factory=list)      # block -> session (-1: system prompt)
    # (t, seq, "req", input blocks, output blocks) or (t, seq, "hint", blocks, hint name), in time order
    ops: list[tuple] = field(default_factory=list)
    sessions: int = 0
    subagents: int = 0
    requests: int = 0
    hints: Counter = field(default_factory=Counter)

    def new_block(self, cls: str, session: int) -> int:
        self.cls.append(cls)
        self.session.append(session)
        return len(self.cls) - 1

    def accesses(self):
        """(t, block, is_read) for every block access in order (hints left out)."""
        for op in self.ops:
            if op[2] == "req":
                t, _, _, inputs, outputs = op
                for b in inputs:
                    yield t, b, True
                for b in outputs:
                    yield t, b, False


def generate(p: TraceParams) -> Trace:
    rng = random.Random(p.seed)
    tr = Trace(p)
    prompts = [[tr.new_block("system", -1) for _ in range(p.system_blocks)] for _ in range(p.agents)]
    ops = tr.ops

    def request(t, inputs, outputs):
        ops.append((t, len(ops), "req", inputs, outputs))

    def hint(t, blocks, name):
        ops.append((t, len(ops), "hint", list(blocks), name))
        tr.hints[name] += 1

    def run_subagent(t, prefix, sid) -> float:
        """Forks from prefix, runs a few short turns, is discarded; returns the time it ends."""
        tr.subagents += 1
        own = [tr.new_block("subagent", sid) for _ in range(rng.randint(1, 3))]   # its task
        for turn in range(rng.randint(3, 10)):
            out = [tr.new_block("subagent", sid) for _ in range(rng.randint(1, 4))]
            scratch = [tr.new_block("decode", sid) for _ in range(rng.randint(1, 2))]
            request(t, prefix + own, out + scratch)
            own = own + out
            t += rng.uniform(1.0, 4.0)                                          # prefill + decode
            t += rng.uniform(0.5, 8.0)                                          # its own short tool call
            own = own + [tr.new_block("subagent", sid) for _ in range(rng.randint(1, 8))]
        hint(t, own, "subagent_done")
        return t

    for sid in range(p.sessions):
        tr.sessions += 1
        t = rng.uniform(0, p.span_s)
        system = prompts[rng.randrange(p.agents)]
        conv = [tr.new_block("conversation", sid) for _ in range(rng.randint(2, 6))]   # the user's task
        n_tasks = rng.randint(*p.tasks)
        for task in range(n_tasks):
            if task:
                t += min(900.0, rng.lognormvariate(0.0, 1.0) * p.think_s)             # the user reads, thinks
                hint(t, conv, "task_resume")
                conv = conv + [tr.new_block("conversation", sid) for _ in range(rng.randint(1, 4))]
            n_turns = rng.randint(*p.turns)
            for turn in range(n_turns):
                out = [tr.new_block("conversation", sid) for _ in range(rng.randint(1, 6))]
                scratch = [tr.new_block("decode", sid) for _ in range(rng.randint(1, 2))]
                request(t, system + conv, out + scratch)
                conv = conv + out
                t += rng.uniform(1.0, 5.0)                                          # prefill + decode
                if turn == n_turns - 1:                                             # final answer
                    hint(t, conv, "task_done")
                    break
                if rng.random() < p.subagent_p:
                    ends = [run_subagent(t, system + conv, sid) for _ in range(rng.randint(1, p.fanout))]
                    t = max(ends)
                    result = sum(rng.randint(1, 4) for _ in ends)                   # their summaries
                else:
                    t += min(60.0, rng.lognormvariate(2.3, 0.9) + 2.0)              # tool call: 2..60 s, median ~12 s
                    result = rng.randint(1, 20)
                conv = conv + [tr.new_block("conversation", sid) for _ in range(result)]
    ops.sort(key=lambda op: (op[0], op[1]))
    tr.requests = sum(1 for op in ops if op[2] == "req")
    return tr


def stats_of(tr: Trace) -> dict:
    """Infinite-cache ceiling and working set: every block read again after its first store is a hit."""
    seen: set[int] = set()
    reads = hits = 0
    for _, b, is_read in tr.accesses():
        if is_read:
            reads += 1
            hits += b in seen
        seen.add(b)
    live = live_set(tr)
    return {"working_set": len(seen), "accesses": reads + sum(len(op[4]) for op in tr.ops if op[2] == "req"),
            "reads": reads, "ceiling_hit": hits / reads, "ceiling_rw": hits / len(seen), **live}


def live_set(tr: Trace) -> dict:
    """Blocks stored and still to be read (between first store and last read), over the accesses."""
    first: dict[int, int] = {}
    last_read: dict[int, int] = {}
    for i, (_, b, is_read) in enumerate(tr.accesses()):
        first.setdefault(b, i)
        if is_read:
            last_read[b] = i
    n = i + 1
    delta = [0] * (n + 1)
    for b, f in first.items():
        lr = last_read.get(b)
        if lr is not None and lr > f:
            delta[f] += 1
            delta[lr] -= 1
    level = peak = total = 0
    for d in delta[:n]:
        level += d
        total += level
        peak = max(peak, level)
    return {"live_mean": total / n, "live_peak": peak}


# -- simulators --------------------------------------------------------------------------------------
def new_stats(policy: str, capacity: int, frac: float) -> dict:
    return {"policy": policy, "capacity": capacity, "frac": frac, "reads": 0, "cpu_hits": 0, "disk_hits": 0,
            "misses": 0, "prefix_hits": 0, "writes": 0, "evictions": Counter(), "pressure": 0, "bypassed": 0,
            "hits_by_class": Counter(), "reads_by_class": Counter()}


def make_policy(name: str, clock):
    if name == "lru":
        return LruPolicy()
    if name == "retention":
        return RetentionPolicy(clock=clock)
    if name == "retention-lru":
        return RetentionPolicy(clock=clock, pinned_order="lru")
    raise ValueError(name)


def scale(ret: Retention, time_scale: float) -> Retention:
    return ret if time_scale == 1 or ret.ttl_s is None else Retention(ret.cls, ret.priority, ret.ttl_s / time_scale)


def simulate_policy(tr: Trace, capacity: int, frac: float, name: str, hints: bool = True,
                    time_scale: float = 1.0) -> dict:
    """Replays tr against a CPU tier of `capacity` blocks run by policy `name` (see module docstring).
    time_scale > 1 compresses time as --daemon does: the clock reads t / time_scale, TTLs are divided."""
    now = [0.0]
    at_commit = {c: scale(r, time_scale) for c, r in HARNESS_RETENTION.items()}
    hinted = {n: scale(r, time_scale) for n, r in HINTS.items()}
    policy = make_policy(name, lambda: now[0])
    retains = hasattr(policy, "retain")
    ttl_pinned = getattr(policy, "is_ttl_pinned", None)
    stats = new_stats(name, capacity, frac)
    cls = tr.cls
    current = {}                              # block -> retention as last set (the catalog's copy)
    cached: set[int] = set()
    stored: set[int] = set()                  # on disk: everything ever stored
    evictions, hits_by, reads_by = stats["evictions"], stats["hits_by_class"], stats["reads_by_class"]
    reads = cpu_hits = disk_hits = misses = prefix_hits = writes = pressure = 0
    for op in tr.ops:
        now[0] = op[0] / time_scale
        if op[2] == "hint":
            if hints:
                ret = hinted[op[4]]
                for b in op[3]:
                    if b in stored:
                        current[b] = ret
                        if retains and b in cached:
                            policy.retain(b, ret)
            continue
        inputs, outputs = op[3], op[4]
        new = []
        leading = True
        for b in inputs:
            reads_by[cls[b]] += 1
            if b in cached:
                policy.accessed(b)
                cpu_hits += 1
                hits_by[cls[b]] += 1
                prefix_hits += leading
                continue
            leading = False
            if b in stored:
                disk_hits += 1
            else:
                misses += 1
            new.append(b)
        reads += len(inputs)
        new.extend(outputs)
        need = len(cached) + len(new) - capacity
        if need > 0:
            victims = []
            for v in policy.candidates():
                victims.append(v)
                if len(victims) == need:
                    break
            for v in victims:
                if ttl_pinned is not None and ttl_pinned(v):
                    pressure += 1                  # a TTL-pinned victim: demoted to disk, counted
                evictions[cls[v]] += 1
                policy.removed(v)
                cached.discard(v)
        for b in new:
            if retains:
                policy.retain(b, current.get(b) or at_commit[cls[b]])
            policy.inserted(b)
            cached.add(b)
            stored.add(b)
        writes += len(new)
    stats.update(reads=reads, cpu_hits=cpu_hits, disk_hits=disk_hits, misses=misses, prefix_hits=prefix_hits,
                 writes=writes, pressure=pressure)
    return stats


def next_reads(tr: Trace) -> list[float]:
    """For access i: the index of the next read of the same block (inf: never read again)."""
    blocks = [(b, is_read) for _, b, is_read in tr.accesses()]
    nxt: list[float] = [NEVER] * len(blocks)
    last: dict[int, float] = {}
    for i in range(len(blocks) - 1, -1, -1):
        b, is_read = blocks[i]
        nxt[i] = last.get(b, NEVER)
        if is_read:
            last[b] = i
    return nxt


def simulate_belady(tr: Trace, capacity: int, frac: float, nxt: list[float]) -> dict:
    """Offline optimum for CPU hits: evicts the block whose next read is furthest, and does not admit
    a block read later than everything cached (bypass: it stays on disk only). Block by block."""
    stats = new_stats("belady", capacity, frac)
    cached: dict[int, float] = {}                 # block -> index of its next read
    heap: list[tuple[float, int]] = []            # (-next read, block), stale entries skipped
    stored: set[int] = set()
    cls = tr.cls
    evictions, hits_by, reads_by = stats["evictions"], stats["hits_by_class"], stats["reads_by_class"]
    reads = cpu_hits = disk_hits = misses = prefix_hits = writes = bypassed = 0
    i = 0
    for op in tr.ops:
        if op[2] != "req":
            continue
        leading = True
        for is_read, blocks in ((True, op[3]), (False, op[4])):
            for b in blocks:
                n = nxt[i]
                i += 1
                if is_read:
                    reads += 1
                    reads_by[cls[b]] += 1
                    if b in cached:
                        cpu_hits += 1
                        hits_by[cls[b]] += 1
                        prefix_hits += leading
                        cached[b] = n
                        heapq.heappush(heap, (-n, b))
                        continue
                    leading = False
                    if b in stored:
                        disk_hits += 1
                    else:
                        misses += 1
                stored.add(b)
                if len(cached) >= capacity:
                    while cached.get(heap[0][1]) != -heap[0][0]:
                        heapq.heappop(heap)
                    if -heap[0][0] <= n:              # nothing cached is read later than this block
                        bypassed += 1
                        continue
                    _, victim = heapq.heappop(heap)
                    del cached[victim]
                    evictions[cls[victim]] += 1
                cached[b] = n
                heapq.heappush(heap, (-n, b))
                writes += 1
                if len(heap) > 4 * capacity + 1024:
                    heap = [(-v, k) for k, v in cached.items()]
                    heapq.heapify(heap)
    stats.update(reads=reads, cpu_hits=cpu_hits, disk_hits=disk_hits, misses=misses, prefix_hits=prefix_hits,
                 writes=writes, bypassed=bypassed)
    return stats
