"""Agent-aware retention policy: class/priority/LRU order, TTL pins, cache_control, SlotTier order."""

from __future__ import annotations

import pytest

from kvtier.tiers.eviction import EvictionPolicy, LruPolicy
from kvtier.tiers.retention import (DEFAULT_RETENTION, RETENTION_POLICIES, HitDensity, Retention, RetentionPolicy,
                                    parse_cache_control, range_retention)
from kvtier.tiers.slots import FreeList, SlotTier


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def policy(clock):
    return RetentionPolicy(clock=clock)


def fill(policy, items):
    for block_id, ret in items:
        policy.retain(block_id, ret)
        policy.inserted(block_id)


def test_registered_and_is_an_eviction_policy():
    assert RETENTION_POLICIES["retention"] is RetentionPolicy
    assert isinstance(RetentionPolicy(), EvictionPolicy)


def test_class_order(policy):
    fill(policy, [("sys", Retention("system")), ("conv", Retention("conversation")),
                  ("sub", Retention("subagent")), ("eph", Retention("ephemeral")), ("dec", Retention("decode"))])
    order = list(policy.candidates())
    assert order[:2] == ["eph", "dec"] and order[2:] == ["sub", "conv", "sys"]
    assert len(policy) == 5


def test_priority_within_class(policy):
    fill(policy, [("hi", Retention("conversation", 90)), ("lo", Retention("conversation", 10)),
                  ("mid", Retention("conversation", 50)), ("sub_hi", Retention("subagent", 100))])
    assert list(policy.candidates()) == ["sub_hi", "lo", "mid", "hi"]


def test_lru_within_equal_class_and_priority(policy):
    fill(policy, [(i, Retention("subagent", 20)) for i in range(4)])
    policy.accessed(1)
    policy.accessed(0)
    assert list(policy.candidates()) == [2, 3, 1, 0]


def test_default_retention_for_blocks_never_retained(policy):
    policy.inserted("plain")
    policy.retain("eph", Retention("ephemeral"))
    policy.inserted("eph")
    policy.retain("sys", Retention("system"))
    policy.inserted("sys")
    assert policy.retention_of("plain") == DEFAULT_RETENTION == Retention("conversation", 50, None)
    assert list(policy.candidates()) == ["eph", "plain", "sys"]


def test_retain_after_insert_and_replace(policy):
    fill(policy, [("a", Retention("system")), ("b", Retention("conversation"))])
    policy.retain("a", Retention("decode"))
    assert list(policy.candidates()) == ["a", "b"]


def test_removed_forgets(policy):
    fill(policy, [("a", Retention("system", ttl_s=300)), ("b", Retention("decode"))])
    policy.removed("a")
    policy.removed("missing")
    assert list(policy.candidates()) == ["b"] and len(policy) == 1
    assert not policy.is_ttl_pinned("a")
    policy.inserted("a")                        # re-inserted without retain: default retention
    assert policy.retention_of("a") == DEFAULT_RETENTION and not policy.is_ttl_pinned("a")


def test_retention_validation():
    with pytest.raises(ValueError):
        Retention("bogus")
    with pytest.raises(ValueError):
        Retention("system", 101)
    with pytest.raises(ValueError):
        Retention("system", -1)
    with pytest.raises(ValueError):
        Retention("system", 5, ttl_s=0)


def test_ttl_pins_survive_a_tool_call_pause_where_lru_evicts(clock, policy):
    """A conversation pinned for 5 minutes, a 30 s tool-call pause during which other work streams
    decode blocks: LRU would evict the conversation first, the retention policy evicts the decode
    blocks and only reaches the pinned blocks when nothing else is left."""
    lru = LruPolicy()
    conv = [("conv", i) for i in range(3)]
    ttl = parse_cache_control({"type": "ephemeral", "ttl": "5m"})
    for b in conv:
        policy.retain(b, Retention("conversation", 50, ttl))
        policy.inserted(b)
        lru.inserted(b)
    clock.advance(30)                              # tool call running
    noise = [("dec", i) for i in range(3)]
    for b in noise:
        policy.retain(b, Retention("system", 100))  # even a higher class: unpinned goes first
        policy.inserted(b)
        lru.inserted(b)
    assert list(lru.candidates())[:3] == conv      # LRU: the paused conversation goes first
    order = list(policy.candidates())
    assert order[:3] == noise and order[3:] == conv[::-1]   # pinned, one window: the chain's tail first
    assert all(policy.is_ttl_pinned(b) for b in conv) and not any(policy.is_ttl_pinned(b) for b in noise)


def test_expiry_releases_pins(clock, policy):
    fill(policy, [("pinned", Retention("system", 100, 300)), ("old", Retention("conversation")),
                  ("eph", Retention("ephemeral"))])
    assert list(policy.candidates()) == ["eph", "old", "pinned"]
    clock.advance(299.9)
    assert policy.is_ttl_pinned("pinned")
    clock.advance(0.2)
    assert not policy.is_ttl_pinned("pinned")
    # unpinned again: back in class order (system is last of the classes anyway)
    assert list(policy.candidates()) == ["eph", "old", "pinned"]
    fill(policy, [("c2", Retention("conversation", 50, 300))])
    assert list(policy.candidates()) == ["eph", "old", "pinned", "c2"]


def test_expired_block_is_oldest_of_its_bucket(clock, policy):
    fill(policy, [("p", Retention("conversation", 50, 60)), ("q", Retention("conversation", 50, None))])
    clock.advance(61)
    assert list(policy.candidates()) == ["p", "q"]


def test_hit_refreshes_ttl(clock, policy):
    fill(policy, [("a", Retention("conversation", 50, 300)), ("b", Retention("conversation", 50, 300))])
    clock.advance(200)
    policy.accessed("a")
    clock.advance(200)                             # b: 400 s old, a: hit 200 s ago
    assert policy.is_ttl_pinned("a") and not policy.is_ttl_pinned("b")
    assert list(policy.candidates()) == ["b", "a"]
    clock.advance(101)
    assert not policy.is_ttl_pinned("a")
    policy.accessed("a")                           # a hit after expiry pins it again
    assert policy.is_ttl_pinned("a")
    assert list(policy.candidates()) == ["b", "a"]


def test_many_refreshes_keep_heap_bounded(clock, policy):
    fill(policy, [(i, Retention("conversation", 50, 300)) for i in range(10)])
    for _ in range(1000):
        clock.advance(1)
        for i in range(10):
            policy.accessed(i)
    assert len(policy._heap) <= 2 * 10 + 64 + 1
    assert all(policy.is_ttl_pinned(i) for i in range(10))


def test_parse_cache_control():
    assert parse_cache_control({"type": "ephemeral"}) == 300
    assert parse_cache_control({"type": "ephemeral", "ttl": "5m"}) == 300
    assert parse_cache_control({"type": "ephemeral", "ttl": "1h"}) == 3600
    for bad in ({"type": "ephemeral", "ttl": "10m"}, {"type": "ephemeral", "ttl": 300}, {"type": "persistent"},
                {}, None, "5m"):
        with pytest.raises(ValueError):
            parse_cache_control(bad)


def test_range_retention():
    sys_ret, conv = Retention("system", 90, 3600), Retention("conversation", 50, 300)
    out = range_retention(5, 16, 40, sys_ret, conv)      # tokens 0..39 -> blocks 0,1,2 (block 2 straddles)
    assert out == [sys_ret] * 3 + [conv] * 2
    assert range_retention(4, 16, 32, sys_ret, conv) == [sys_ret] * 2 + [conv] * 2
    assert range_retention(2, 16, 1000, sys_ret, conv) == [sys_ret] * 2
    assert range_retention(3, 16, 0, sys_ret, conv) == [conv] * 3
    assert range_retention(0, 16, 10, sys_ret, conv) == []
    with pytest.raises(ValueError):
        range_retention(3, 0, 10, sys_ret, conv)


class Pool(FreeList):
    slot_bytes = 64


def test_slot_tier_reserve_evicts_in_policy_order(clock):
    policy = RetentionPolicy(clock=clock)
    tier = SlotTier(Pool(5), policy)
    plan = [("sys", Retention("system", 90, 3600)), ("conv", Retention("conversation", 50, 300)),
            ("sub", Retention("subagent", 10)), ("dec", Retention("decode", 0)),
            ("conv_lo", Retention("conversation", 10))]
    for block_id, ret in plan:
        slots, evicted = tier.reserve(1)
        assert evicted == []
        policy.retain(block_id, ret)
        tier.install(block_id, slots[0], 10)
    tier.hold("dec", "reader")                                 # a transfer pin: skipped by the tier
    slots, evicted = tier.reserve(2)
    assert evicted == ["sub", "conv_lo"] and len(slots) == 2
    tier.unreserve(slots)
    tier.release(tier.slot_of("dec"), "reader")
    slots, evicted = tier.reserve(3)
    assert evicted == ["dec"]                       # 2 were free, 1 evicted
    tier.unreserve(slots)
    # only TTL-pinned blocks left: reaching them is pressure eviction, visible to the caller
    slots, evicted = tier.reserve(4)
    assert evicted == ["conv"] and policy.is_ttl_pinned("conv") is False  # removed -> not pinned
    assert "sys" in tier and policy.is_ttl_pinned("sys")
    tier.unreserve(slots)
    clock.advance(3601)
    assert not policy.is_ttl_pinned("sys")
    assert tier.evictions == 4


def test_slot_tier_caller_counts_pressure_evictions(clock):
    """How a store counts/demotes: look at is_ttl_pinned before evicting."""
    policy = RetentionPolicy(clock=clock)
    tier = SlotTier(Pool(3), policy)
    for i, ret in enumerate([Retention("conversation", 50, 300), Retention("decode"), Retention("system", 50, 3600)]):
        slots, _ = tier.reserve(1)
        policy.retain(i, ret)
        tier.install(i, slots[0], 1)
    victims = list(policy.candidates())[:2]
    pressure = [v for v in victims if policy.is_ttl_pinned(v)]
    slots, evicted = tier.reserve(2)
    assert evicted == victims == [1, 0] and pressure == [0]


# -- pinned order: rank merge, windows, hit density ------------------------------------------------
CONV_5M = Retention("conversation", 50, 300)


def test_pinned_subagent_ranks_with_conversation_unpinned_below_it(clock, policy):
    """A running subagent (pinned) is re-read every turn: among pinned blocks it is not evicted just for
    its class; once unpinned (finished: demoted without TTL) it goes before any conversation block."""
    fill(policy, [("sub_running", Retention("subagent", 50, 300))])
    clock.advance(5)
    fill(policy, [("conv", CONV_5M)])
    assert list(policy.candidates()) == ["sub_running", "conv"]      # older window first (no data yet)
    policy.accessed("sub_running")                                    # its next turn
    assert list(policy.candidates()) == ["conv", "sub_running"]      # a class rank would keep "conv"
    fill(policy, [("conv_plain", Retention("conversation", 50))])
    policy.retain("sub_running", Retention("subagent", 50))           # finished: demoted, no TTL
    assert list(policy.candidates()) == ["sub_running", "conv_plain", "conv"]


def test_pinned_window_yields_chain_tail_first(clock, policy):
    chain = [("s", i) for i in range(4)]
    fill(policy, [(b, CONV_5M) for b in chain])
    clock.advance(0.2)                                                # same window (epoch_s = 1)
    policy.accessed(chain[0])                                         # re-filed last: goes first
    assert list(policy.candidates()) == [chain[0], chain[3], chain[2], chain[1]]
    clock.advance(2)
    for b in chain:                                                   # the next request re-reads the prefix
        policy.accessed(b)
    assert list(policy.candidates()) == chain[::-1]


def test_pinned_order_lru_option_and_validation(clock):
    lru_pinned = RetentionPolicy(clock=clock, pinned_order="lru")
    fill(lru_pinned, [("a", CONV_5M)])
    clock.advance(10)
    fill(lru_pinned, [("b", CONV_5M)])
    assert list(lru_pinned.candidates()) == ["a", "b"]
    with pytest.raises(ValueError):
        RetentionPolicy(clock=clock, pinned_order="mru")
    with pytest.raises(ValueError):
        RetentionPolicy(clock=clock, epoch_s=0)


def test_hit_density_model():
    model = HitDensity(refresh=1)
    assert model.density(5) == 0                                      # no data
    for _ in range(100):
        model.record(10.2, hit=True)                                  # re-read 10 s after the last read
    for _ in range(5):
        model.record(100.0, hit=False)                                # gone: evicted after 100 s unused
    young, due, old = model.density(0.3), model.density(9.0), model.density(150.0)
    assert due > young > 0 and old == 0
    assert HitDensity.bin_of(0) == 0 and HitDensity.bin_of(0.49) == 0 and HitDensity.bin_of(0.5) == 1
    assert HitDensity.bin_of(1e9) == len(HitDensity.EDGES)
    decaying = HitDensity(refresh=1, decay_every=4)
    for _ in range(4):
        decaying.record(10.2, hit=True)
    assert sum(decaying.hits) == 2.0 and sum(decaying.ends) == 2.0     # halved every 4 events
    with pytest.raises(ValueError):
        HitDensity(refresh=0)


def train_sessions(clock, policy, pause: float = 10.0, rounds: int = 60, dead_after: float = 100.0):
    """History the policy learns from: conversation blocks re-read every `pause` s, and some blocks
    stored, never read again and evicted after `dead_after` s."""
    for r in range(rounds):
        blocks = [("train", r, i) for i in range(4)]
        fill(policy, [(b, CONV_5M) for b in blocks])
        clock.advance(pause)
        for b in blocks:
            policy.accessed(b)                                        # hit at age `pause`
        clock.advance(pause)
        for b in blocks:
            policy.accessed(b)
        if r % 10 == 0:
            gone = ("gone", r)
            fill(policy, [(gone, CONV_5M)])
            clock.advance(dead_after)
            policy.removed(gone)                                      # evicted unread (a removal = an end)
        for b in blocks:
            policy.removed(b)


def test_density_keeps_the_session_due_back_and_drops_the_one_just_served_or_gone(clock, policy):
    """Learned from history: sessions come back ~10 s after a request. Under pressure the pinned order
    is: the session idle far longer than any pause seen (gone) first, then the one that was just served
    (its tool call has just started), and last the one that has been paused for 9 s (due back now).
    Plain LRU among pinned blocks would keep the one just served and evict the one due back."""
    train_sessions(clock, policy)
    fill(policy, [(("old", i), CONV_5M) for i in range(2)])
    for b in [("old", i) for i in range(2)]:
        policy.accessed(b)                                            # a reused session ...
    clock.advance(150)                                                # ... idle for 150 s: gone
    fill(policy, [(("due", i), CONV_5M) for i in range(2)])
    for b in [("due", i) for i in range(2)]:
        policy.accessed(b)
    clock.advance(9)
    fill(policy, [(("fresh", i), CONV_5M) for i in range(2)])
    for b in [("fresh", i) for i in range(2)]:
        policy.accessed(b)
    clock.advance(0.3)
    order = list(policy.candidates())
    assert [b[0] for b in order] == ["old", "old", "fresh", "fresh", "due", "due"]
    assert all(policy.is_ttl_pinned(b) for b in order)               # all pinned: the order is the policy's


def test_blocks_never_hit_are_modelled_apart_from_reused_ones(clock, policy):
    """Two kinds within one class: stored-and-never-read blocks (here they are never read, evicted
    after 50 s) and blocks already hit once (re-read every 10 s). A never-read block goes before a
    reused one of the same age even when the reused one is older."""
    for r in range(60):
        reused = ("reused", r)
        fill(policy, [(reused, CONV_5M)])
        clock.advance(1)
        policy.accessed(reused)
        clock.advance(10)
        policy.accessed(reused)                                       # reused kind: hit at age 10
        one_off = ("one_off", r)
        fill(policy, [(one_off, CONV_5M)])
        clock.advance(50)
        policy.removed(one_off)                                       # never-read kind: ends unread
        policy.removed(reused)
    fill(policy, [("r", CONV_5M)])
    clock.advance(1)
    policy.accessed("r")
    clock.advance(1.5)
    fill(policy, [("n", CONV_5M)])                                    # younger, but of the kind never read
    clock.advance(3)
    assert list(policy.candidates()) == ["n", "r"]


def test_slot_tier_reserve_with_density_order_counts_pressure(clock):
    """SlotTier walks candidates(): a tier-pinned (transfer) block is skipped, the learned order decides
    among TTL-pinned blocks, and every such victim is a pressure eviction."""
    policy = RetentionPolicy(clock=clock)
    train_sessions(clock, policy, rounds=30)
    tier = SlotTier(Pool(6), policy)
    for name, age in (("gone", 150), ("due", 9), ("fresh", 0.3)):
        for i in range(2):
            slots, _ = tier.reserve(1)
            policy.retain((name, i), CONV_5M)
            tier.install((name, i), slots[0], 1)
            policy.accessed((name, i))
    # ages: install order is time order; re-touch to give each pair its age
    clock.advance(150)
    for i in range(2):
        tier.touch(("due", i))
    clock.advance(9)
    for i in range(2):
        tier.touch(("fresh", i))
    clock.advance(0.3)
    tier.hold(("gone", 0), "reader")                                             # being read: the tier skips it
    slots, evicted = tier.reserve(3)
    assert evicted == [("gone", 1), ("fresh", 1), ("fresh", 0)] and tier.pressure_evictions == 3
    tier.unreserve(slots)
