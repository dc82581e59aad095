"""Agentic-trace replay: LRU vs the retention policy vs Belady's offline optimum (issue 5).

A seeded generator writes synthetic coding-agent sessions at block granularity:
  * every session uses one of `--agents` shared system prompts (class "system", cache_control "1h");
  * a conversation that grows every turn: the model's output and the next tool result are appended
    (class "conversation", cache_control "5m"); each request reads system prompt + whole conversation;
  * decode scratch blocks written once and never read again (class "decode");
  * tool-call pauses of 2 s to 60 s between the turns of a session;
  * some tool calls are subagents: they fork from the conversation (read its prefix), run a few short
    turns of their own (class "subagent") and are discarded; the parent waits for them;
  * `--sessions` sessions starting at random times, so that several run concurrently.

The simulator replays the block accesses against a cache of `capacity` blocks: an input block that is
cached is a hit (a read), otherwise it is computed and written; output blocks are written. Eviction:
LRU (kvtier.tiers.eviction.LruPolicy), the retention policy (kvtier.tiers.retention.RetentionPolicy,
retention set from each block's class and cache_control TTL, clock = trace time), and Belady (evicts
the block whose next read is furthest; does not admit a block read later than everything cached).
Capacities are fractions of the working set (distinct blocks of the trace).

Reported per capacity and policy: hit rate (hit input blocks / input blocks; the infinite-cache
ceiling is given too), R/W ratio (blocks read from the cache / blocks written to it), evictions by
class, and for the retention policy the pressure evictions (TTL-pinned victims: demoted, not dropped).
Goals: retention >= 0.95 x Belady's hit rate and >= 10 points above LRU at the same capacity.
Published reference: 85-97% hit rate and 11.7x reads per write for agentic workloads.
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
import time
from collections import Counter
from pathlib import Path

from _common import Row, add_common_args, log, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kvtier.tiers.eviction import LruPolicy  # noqa: E402
from kvtier.tiers.retention import Retention, RetentionPolicy, parse_cache_control  # noqa: E402

CLASS_CACHE_CONTROL = {"system": {"type": "ephemeral", "ttl": "1h"},
                       "conversation": {"type": "ephemeral", "ttl": "5m"}}
CLASS_PRIORITY = {"system": 90, "conversation": 50, "subagent": 30, "decode": 0}
NEVER = float("inf")


def class_retention() -> dict[str, Retention]:
    out = {}
    for cls, prio in CLASS_PRIORITY.items():
        cc = CLASS_CACHE_CONTROL.get(cls)
        out[cls] = Retention(cls, prio, parse_cache_control(cc) if cc else None)
    return out


# -- trace -------------------------------------------------------------------------------------------
class Trace:
    """Flat, time-ordered block accesses: times[i], blocks[i], reads[i] (True: input block looked up;
    False: output block written); cls[block] is the block's retention class."""

    def __init__(self):
        self.times: list[float] = []
        self.blocks: list[int] = []
        self.reads: list[bool] = []
        self.cls: list[str] = []
        self.requests = 0
        self.sessions = 0
        self.subagents = 0

    def new_block(self, cls: str) -> int:
        self.cls.append(cls)
        return len(self.cls) - 1


def generate(seed: int, sessions: int, agents: int, span_s: float, turns: tuple[int, int],
             system_blocks: int, subagent_p: float) -> Trace:
    rng = random.Random(seed)
    trace = Trace()
    prompts = [[trace.new_block("system") for _ in range(system_blocks)] for _ in range(agents)]
    requests: list[tuple[float, int, list[int], list[int]]] = []   # (t, seq, input blocks, output blocks)

    def request(t, inputs, outputs):
        requests.append((t, len(requests), inputs, outputs))

    def run_subagent(t, prefix) -> float:
        """Forks from prefix, runs a few short turns; returns the time it ends."""
        trace.subagents += 1
        own = [trace.new_block("subagent") for _ in range(rng.randint(1, 3))]   # the task
        for _ in range(rng.randint(3, 10)):
            out = [trace.new_block("subagent") for _ in range(rng.randint(1, 4))]
            scratch = [trace.new_block("decode") for _ in range(rng.randint(1, 2))]
            request(t, prefix + own, out + scratch)
            t += rng.uniform(1.0, 4.0) + rng.uniform(0.5, 8.0)     # generate + short tool call
            own = own + out + [trace.new_block("subagent") for _ in range(rng.randint(1, 8))]
        return t

    for _ in range(sessions):
        trace.sessions += 1
        t = rng.uniform(0, span_s)
        system = prompts[rng.randrange(agents)]
        conv = [trace.new_block("conversation") for _ in range(rng.randint(2, 6))]
        for _ in range(rng.randint(*turns)):
            out = [trace.new_block("conversation") for _ in range(rng.randint(1, 6))]
            scratch = [trace.new_block("decode") for _ in range(rng.randint(1, 2))]
            request(t, system + conv, out + scratch)
            conv = conv + out
            t += rng.uniform(1.0, 5.0)                              # prefill + decode
            if rng.random() < subagent_p:
                t = run_subagent(t, system + conv)
                result = rng.randint(1, 4)
            else:
                t += min(60.0, rng.lognormvariate(2.3, 0.9) + 2.0)  # tool call: 2 s .. 60 s, median ~12 s
                result = rng.randint(1, 20)
            conv = conv + [trace.new_block("conversation") for _ in range(result)]

    requests.sort()
    trace.requests = len(requests)
    for t, _, inputs, outputs in requests:
        for b in inputs:
            trace.times.append(t)
            trace.blocks.append(b)
            trace.reads.append(True)
        for b in outputs:
            trace.times.append(t)
            trace.blocks.append(b)
            trace.reads.append(False)
    return trace


def next_reads(trace: Trace) -> list[float]:
    """For access i: the index of the next read of the same block (inf: never read again)."""
    nxt: list[float] = [NEVER] * len(trace.blocks)
    last: dict[int, float] = {}
    for i in range(len(trace.blocks) - 1, -1, -1):
        b = trace.blocks[i]
        nxt[i] = last.get(b, NEVER)
        if trace.reads[i]:
            last[b] = i
    return nxt


# -- simulators --------------------------------------------------------------------------------------
def new_stats(policy: str, capacity: int, frac: float) -> dict:
    return {"policy": policy, "capacity": capacity, "frac": frac, "lookups": 0, "hits": 0, "writes": 0,
            "evictions": Counter(), "pressure": 0, "bypassed": 0}


def simulate_policy(trace: Trace, capacity: int, frac: float, name: str) -> dict:
    now = [0.0]
    if name == "lru":
        policy = LruPolicy()
        retain = None
    else:
        policy = RetentionPolicy(clock=lambda: now[0])
        by_cls = class_retention()
        retain = policy.retain
    stats = new_stats(name, capacity, frac)
    cached: set[int] = set()
    cls = trace.cls
    evictions = stats["evictions"]
    hits = lookups = writes = pressure = 0
    for t, b, is_read in zip(trace.times, trace.blocks, trace.reads):
        now[0] = t
        if is_read:
            lookups += 1
            if b in cached:
                hits += 1
                policy.accessed(b)
                continue
        if len(cached) >= capacity:
            victim = next(iter(policy.candidates()))
            if retain is not None and policy.is_ttl_pinned(victim):
                pressure += 1                     # a real store demotes it to the next tier
            policy.removed(victim)
            cached.discard(victim)
            evictions[cls[victim]] += 1
        if retain is not None:
            retain(b, by_cls[cls[b]])
        policy.inserted(b)
        cached.add(b)
        writes += 1
    stats.update(lookups=lookups, hits=hits, writes=writes, pressure=pressure)
    return stats


def simulate_belady(trace: Trace, capacity: int, frac: float, nxt: list[float]) -> dict:
    stats = new_stats("belady", capacity, frac)
    cached: dict[int, float] = {}                 # block -> index of its next read
    heap: list[tuple[float, int]] = []            # (-next read, block), stale entries skipped
    cls = trace.cls
    evictions = stats["evictions"]
    hits = lookups = writes = bypassed = 0
    for i, (b, is_read) in enumerate(zip(trace.blocks, trace.reads)):
        n = nxt[i]
        if is_read:
            lookups += 1
            if b in cached:
                hits += 1
                cached[b] = n
                heapq.heappush(heap, (-n, b))
                continue
        if len(cached) >= capacity:
            while cached.get(heap[0][1]) != -heap[0][0]:
                heapq.heappop(heap)
            if -heap[0][0] <= n:                  # nothing cached is read later than this block
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
    stats.update(lookups=lookups, hits=hits, writes=writes, bypassed=bypassed)
    return stats


def ceiling(trace: Trace) -> tuple[float, float]:
    """Infinite cache: (hit rate, reads per write)."""
    seen: set[int] = set()
    hits = lookups = 0
    for b, is_read in zip(trace.blocks, trace.reads):
        if is_read:
            lookups += 1
            hits += b in seen
        seen.add(b)
    return hits / lookups, hits / len(seen)


# -- report ------------------------------------------------------------------------------------------
def plot_curves(path: Path, results: list[dict], ceiling_hit: float) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, style in (("lru", "o-"), ("retention", "s-"), ("belady", "^--")):
        rs = sorted((r for r in results if r["policy"] == name), key=lambda r: r["frac"])
        xs = [100 * r["frac"] for r in rs]
        ax1.plot(xs, [100 * r["hits"] / r["lookups"] for r in rs], style, label=name)
        ax2.plot(xs, [r["hits"] / max(1, r["writes"]) for r in rs], style, label=name)
    ax1.axhline(100 * ceiling_hit, color="gray", linestyle=":", label="infinite cache")
    ax1.axhspan(85, 97, color="tab:green", alpha=0.1, label="published 85-97%")
    ax2.axhline(11.7, color="tab:green", linestyle=":", label="published 11.7x")
    ax1.set_xlabel("capacity (% of working set)")
    ax1.set_ylabel("hit rate (%)")
    ax2.set_xlabel("capacity (% of working set)")
    ax2.set_ylabel("reads per write")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle("Agentic trace: LRU vs retention policy vs Belady", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=48, help="agent sessions (default 48)")
    parser.add_argument("--agents", type=int, default=3, help="distinct system prompts (default 3)")
    parser.add_argument("--span", type=float, default=1800.0, help="sessions start within this many s")
    parser.add_argument("--turns", default="15,40", help="turns per session, min,max (default 15,40)")
    parser.add_argument("--system-blocks", type=int, default=64, help="blocks per system prompt (default 64)")
    parser.add_argument("--subagent-p", type=float, default=0.2, help="P(tool call is a subagent)")
    parser.add_argument("--capacities", default="0.05,0.1,0.2,0.4",
                        help="cache sizes as fractions of the working set (default 0.05,0.1,0.2,0.4)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    turns = tuple(int(x) for x in args.turns.split(","))
    fracs = [float(x) for x in args.capacities.split(",") if x]

    started = time.perf_counter()
    trace = generate(args.seed, args.sessions, args.agents, args.span, turns, args.system_blocks, args.subagent_p)
    working_set = len(trace.cls)
    ceil_hit, ceil_rw = ceiling(trace)
    nxt = next_reads(trace)
    log(f"agentic: {trace.sessions} sessions, {trace.subagents} subagents, {trace.requests} requests, "
        f"{len(trace.blocks)} accesses, working set {working_set} blocks "
        f"({time.perf_counter() - started:.1f} s)")

    results = []
    for frac in fracs:
        capacity = max(1, int(frac * working_set))
        for name in ("lru", "retention"):
            t0 = time.perf_counter()
            results.append(simulate_policy(trace, capacity, frac, name))
            log(f"  {name} @ {frac:.0%}: {time.perf_counter() - t0:.1f} s")
        results.append(simulate_belady(trace, capacity, frac, nxt))

    rows, records = [], []
    by = {(r["policy"], r["frac"]): r for r in results}
    met_all = True
    for frac in fracs:
        lru, ret, bel = by["lru", frac], by["retention", frac], by["belady", frac]
        hit = {k: v["hits"] / v["lookups"] for k, v in (("lru", lru), ("retention", ret), ("belady", bel))}
        cap = f"{frac:.0%} of working set"
        r1 = Row(f"retention hit rate @ {cap}", 100 * hit["retention"], "%", 100 * hit["belady"], "Belady",
                 goal=0.95, headline=True, notes=f"LRU {100 * hit['lru']:.1f}%")
        r2 = Row(f"retention - LRU @ {cap}", 100 * (hit["retention"] - hit["lru"]), "points", goal=10,
                 goal_on="value", headline=True)
        r3 = Row(f"LRU hit rate @ {cap}", 100 * hit["lru"], "%", 100 * hit["belady"], "Belady")
        rows += [r1, r2, r3]
        met_all &= bool(r1.met and r2.met)
        for r in (lru, ret, bel):
            ev = r["evictions"]
            records.append({"capacity": f"{frac:.0%} ({r['capacity']} blocks)", "policy": r["policy"],
                            "hit rate %": round(100 * r["hits"] / r["lookups"], 2),
                            "reads/write": round(r["hits"] / max(1, r["writes"]), 2),
                            "reads": r["hits"], "writes": r["writes"],
                            "evicted system": ev["system"], "evicted conversation": ev["conversation"],
                            "evicted subagent": ev["subagent"], "evicted decode": ev["decode"],
                            "pressure (TTL-pinned) evictions": r["pressure"] if r["policy"] == "retention" else None,
                            "bypassed": r["bypassed"] if r["policy"] == "belady" else None})
    reference = [{"source": "infinite cache (this trace)", "hit rate %": round(100 * ceil_hit, 2),
                  "reads/write": round(ceil_rw, 2)},
                 {"source": "published agentic workload", "hit rate %": "85-97", "reads/write": 11.7}]
    params = {"seed": args.seed, "sessions": args.sessions, "agents": args.agents, "span_s": args.span,
              "turns": args.turns, "system_blocks": args.system_blocks, "subagent_p": args.subagent_p,
              "requests": trace.requests, "accesses": len(trace.blocks), "working_set_blocks": working_set,
              "capacities": args.capacities}
    notes = [
        "Simulation of block-level gets/puts, not a replay through the daemon's API.",
        "Hit rate = input blocks found in the cache / input blocks looked up; the first read of a new block "
        "(tool result, user message) is a compulsory miss for every policy. Reads/write = blocks read from "
        "the cache / blocks written to it.",
        "Retention per class: system p90 cache_control 1h, conversation p50 5m, subagent p30 no TTL, "
        "decode p0 no TTL; clock = trace time. Pressure evictions = TTL-pinned victims (a store demotes them).",
        "Belady evicts the block whose next read is furthest and does not admit a block read later than all "
        "cached ones (offline optimum for hit rate).",
        f"Goals (retention >= 0.95 x Belady and >= +10 points over LRU at every capacity): "
        f"{'MET' if met_all else 'NOT met'}.",
        f"Replay took {time.perf_counter() - started:.1f} s.",
    ]
    data = write_results("agentic", "Agentic trace: retention policy vs LRU vs Belady", rows, params, args.out,
                         {"per capacity and policy": records, "reference": reference}, notes,
                         plot=not args.no_plot)
    if not args.no_plot and plot_curves(Path(args.out) / "agentic_curves.png", results, ceil_hit):
        data["png_curves"] = str(Path(args.out) / "agentic_curves.png")
    print(f"goals {'MET' if met_all else 'NOT met'}: " + "; ".join(
        f"{r.name}: {r.value:.1f} {r.unit} ({'met' if r.met else 'NOT met'})" for r in rows if r.goal is not None))
    return data


if __name__ == "__main__":
    main()
