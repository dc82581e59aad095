"""The agent-hint schema shared by the vLLM and SGLang connectors (pure Python, no engine)."""

from __future__ import annotations

import pytest

from kvtier.connectors._hints import NO_HINTS, HintError, Hints, parse_hints, parse_kv_hint, to_pb
from kvtier.tiers.retention import Retention, range_retention

SYSTEM_1H = Retention("system", 90, 3600.0)
CONVERSATION_5M = Retention("conversation", 70, 300.0)


def test_full_hint_object():
    hints, unknown = parse_hints({
        "retention": {"class": "conversation", "priority": 70, "cache_control": {"type": "ephemeral"}},
        "ranges": [{"tokens": 2048, "class": "system", "priority": 90, "cache_control": {"type": "ephemeral",
                                                                                         "ttl": "1h"}},
                   {"tokens": 100, "class": "subagent"}],
        "decode": {"class": "decode", "priority": 5}, "osl": 512, "prefetch": True, "latency_sensitivity": 2})
    assert unknown == ["latency_sensitivity"]
    assert hints == Hints(retention=CONVERSATION_5M,
                          ranges=((2048, SYSTEM_1H), (2148, Retention("subagent", 50, None))),
                          decode=Retention("decode", 5, None), osl=512, prefetch=True)
    assert to_pb(SYSTEM_1H).cls == "system" and to_pb(SYSTEM_1H).ttl_s == 3600.0
    assert to_pb(Retention("decode", 5, None)).ttl_s == 0.0 and to_pb(None) is None


def test_block_retention_first_overlapping_range_then_prompt_then_decode():
    hints, _ = parse_hints({"ranges": [{"tokens": 40, "class": "system", "priority": 90},
                                       {"tokens": 24, "class": "subagent", "priority": 10}],
                            "retention": {"priority": 60}, "decode": {"class": "decode"}})
    system, subagent = Retention("system", 90), Retention("subagent", 10)
    prompt, decode = Retention("conversation", 60), Retention("decode", 50)
    # 32-token blocks, a 100-token prompt: block 1 holds tokens 32..63 (system up to 39, then subagent),
    # block 2 starts at 64 (past both ranges), block 3 holds prompt tokens 96..99, block 4 only output.
    assert hints.retentions(range(6), 32, prompt_tokens=100) == [system, system, prompt, prompt, decode, decode]
    assert hints.retentions(range(6), 32) == [system, system, prompt, prompt, prompt, prompt]  # no prompt length
    assert hints.retentions([1], 16) == [system] and hints.retentions([2, 3], 16) == [system, subagent]


@pytest.mark.parametrize("first_tokens", [1, 31, 32, 33, 100, 4096])
def test_one_range_is_range_retention(first_tokens):
    hints, _ = parse_hints({"ranges": [{"tokens": first_tokens, "class": "system"}],
                            "retention": {"class": "subagent"}})
    want = range_retention(10, 32, first_tokens, Retention("system"), Retention("subagent"))
    assert hints.retentions(range(10), 32) == want


def test_request_keys_replace_the_defaults_key_by_key():
    defaults, _ = parse_hints({"retention": {"class": "subagent", "priority": 30},
                               "ranges": [{"tokens": 64, "class": "system"}]})
    hints, _ = parse_hints({"retention": {"priority": 80}, "prefetch": True}, defaults)
    assert hints.retention == Retention("conversation", 80)  # whole, not merged with the default's class
    assert hints.ranges == defaults.ranges and hints.prefetch
    assert parse_hints(None, defaults) == (defaults, [])
    assert parse_hints({"ranges": [], "retention": None}, defaults)[0] == Hints()
    assert not NO_HINTS.sets_retention and NO_HINTS.retentions([0, 1], 32) == [None, None]


@pytest.mark.parametrize("obj,message", [
    ("system", "hints must be an object"),
    ({"retention": {"class": "forever"}}, "retention.class must be one of"),
    ({"retention": {"priority": 101}}, "retention.priority must be an integer 0..100"),
    ({"retention": {"priority": True}}, "retention.priority"),
    ({"retention": {"priority": 50.0}}, "retention.priority"),
    ({"retention": "system"}, "retention must be an object"),
    ({"retention": {"cache_control": {"type": "persistent"}}}, "retention.cache_control type must be 'ephemeral'"),
    ({"retention": {"cache_control": {"type": "ephemeral", "ttl": "2h"}}}, "ttl must be '5m' or '1h'"),
    ({"ranges": [{"tokens": 0}]}, r"ranges\[0\].tokens must be a positive integer"),
    ({"ranges": [{"tokens": 10}, {"class": "system"}]}, r"ranges\[1\].tokens"),
    ({"ranges": {"tokens": 10}}, "ranges must be a list"),
    ({"ranges": [{"tokens": 1}] * 65}, "at most 64"),
    ({"ranges": [{"tokens": 10, "priority": -1}]}, r"ranges\[0\].priority"),
    ({"decode": {"class": "later"}}, "decode.class"),
    ({"osl": -1}, "osl must be a non-negative integer"),
    ({"osl": "512"}, "osl"),
    ({"prefetch": "yes"}, "prefetch must be true or false"),
])
def test_bad_values_are_refused_with_the_field_named(obj, message):
    with pytest.raises(HintError, match=message):
        parse_hints(obj)


def test_unknown_keys_are_reported_at_every_level():
    hints, unknown = parse_hints({"retention": {"clas": "system"}, "ranges": [{"tokens": 8, "ttl": 5}],
                                  "future_hint": 1})
    assert sorted(unknown) == ["future_hint", "ranges[0].ttl", "retention.clas"]
    assert hints.retention == Retention()  # the misspelt class is not applied


@pytest.mark.parametrize("envelope,peer", [
    (None, ""),
    ({"version": 1, "actions": [{"type": "kv.fetch@1.0", "source": "10.0.0.7:9478"}]}, "10.0.0.7:9478"),
    ({"actions": [{"type": "kv.fetch@1.0", "source": " node2 "}]}, "node2"),  # no version: 1
    ({"version": "1.0", "router": "dynamo", "actions": [  # unknown fields and actions are ignored
        {"type": "kv.evict@1.0", "source": "x"},
        {"type": "kv.fetch@1.2", "source": {"node_id": "node2", "worker_id": 7}, "blocks": 12},
        {"type": "kv.fetch@1.0", "source": "second"}]}, "node2"),
    ({"version": 1, "actions": [{"type": "kv.fetch@1.0", "source": {"address": "10.0.0.7:9478"}}]},
     "10.0.0.7:9478"),
    ({"version": 1, "actions": []}, ""),
    ({"version": 1, "actions": [{"type": "kv.fetch@2.0", "source": "node2"}, "junk"]}, ""),
])
def test_a_routers_kv_fetch_hint_names_the_peer(envelope, peer):
    assert parse_kv_hint(envelope) == peer


@pytest.mark.parametrize("envelope,message", [
    ("node2", "kv_hint must be an object"),
    ({"version": 2, "actions": []}, "kv_hint.version must be 1"),
    ({"version": True}, "kv_hint.version"),
    ({"actions": {"type": "kv.fetch@1.0"}}, "kv_hint.actions must be a list"),
    ({"actions": [{"type": "kv.fetch@1.0"}]}, r"kv_hint.actions\[0\].source"),
    ({"actions": [{"type": "kv.fetch@1.0", "source": 7}]}, r"kv_hint.actions\[0\].source"),
    ({"actions": [{"type": "kv.fetch@1.0", "source": "  "}]}, "source"),
    ({"actions": [{"type": "kv.fetch@1.0", "source": "x" * 257}]}, "source"),
])
def test_a_malformed_kv_hint_is_refused(envelope, message):
    with pytest.raises(HintError, match=message):
        parse_kv_hint(envelope)
