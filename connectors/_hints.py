"""Agent hints: how long a request's blocks should stay in kvtier, as the harness says it.

One JSON object, the same for every engine (docs/vllm.md, docs/sglang.md)::

    {"retention": {"class": "conversation", "priority": 70,
                   "cache_control": {"type": "ephemeral", "ttl": "1h"}},   # the request's blocks
     "ranges": [{"tokens": 2048, "class": "system", "priority": 90,        # consecutive token ranges
                 "cache_control": {"type": "ephemeral", "ttl": "1h"}}],    # from the first token
     "decode": {"class": "decode", "priority": 10},                         # blocks of generated tokens only
     "osl": 512,                                                            # expected output tokens
     "prefetch": true}                                                      # warm the stored prefix

A retention object: ``class`` (``system``, ``conversation``, ``subagent``, ``ephemeral``, ``decode``;
default ``conversation``), ``priority`` (int 0..100, default 50), ``cache_control`` (Anthropic's:
``{"type": "ephemeral"}`` or ``"ttl": "5m"`` pins for 300 s, ``"ttl": "1h"`` for 3600 s; absent or
null: no pin). Each retention object stands alone (a missing field takes that default, not the
request's). Block ``i`` covers tokens ``[i*B, (i+1)*B)`` and gets the retention of the first of these
that it overlaps: the ranges in order, then the prompt (``retention``); a block made only of generated
tokens gets ``decode`` when given. Blocks without any retention get the daemon's default
(conversation, 50, no pin).

Connector-wide defaults use the same object (extra config ``default_hints``); a request's object
replaces the defaults key by key (a request ``retention`` replaces the default ``retention`` whole).
Unknown keys are reported and ignored; a bad value makes the whole request object invalid
(``HintError``): the connector then warns once and uses the defaults.

Router-named source (``parse_kv_hint``): a router (NVIDIA Dynamo) may name the worker to pull the
prefix from in ``kv_transfer_params["kv_hint"]``, a versioned envelope::

    {"version": 1, "actions": [{"type": "kv.fetch@1.0", "source": "10.0.0.7:9478"}]}

``version`` is 1 (``1``, ``"1"`` or ``"1.0"``; absent reads as 1); the first action of type
``kv.fetch@1.0`` (any ``kv.fetch@1.x``) names the peer in ``source``: a string, or an object with
``address`` or ``node_id``, either an address in the daemon's peers.addresses or a peer's node id.
Other action types and unknown fields are ignored; no ``kv.fetch`` action means no named peer. A
malformed envelope (not an object, another version, ``actions`` not a list, a fetch action without
a usable source) is a ``HintError``: the connector counts it as a bad hint and names no peer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kvtier.proto.v1 import kvtier_pb2 as pb
from kvtier.tiers.retention import CLASSES, Retention, parse_cache_control

HINTS_KEY = "kvtier"
KV_HINT_KEY = "kv_hint"          # the router's envelope (parse_kv_hint)
KV_FETCH_ACTION = "kv.fetch@1."  # prefix of the action types naming the source peer
MAX_PEER_NAME = 256
MAX_RANGES = 64
_RETENTION_KEYS = {"class", "priority", "cache_control"}
_TOP_KEYS = {"retention", "ranges", "decode", "osl", "prefetch"}


class HintError(ValueError):
    """A hint object that cannot be used (the message says which field and why)."""


@dataclass(frozen=True)
class Hints:
    retention: Retention | None = None                   # the request's blocks (None: daemon default)
    ranges: tuple[tuple[int, Retention], ...] = ()       # (end token, exclusive; retention), ascending
    decode: Retention | None = None                      # blocks made only of generated tokens
    osl: int | None = None                               # expected output length in tokens
    prefetch: bool = False

    @property
    def sets_retention(self) -> bool:
        return self.retention is not None or bool(self.ranges) or self.decode is not None

    def retention_of_block(self, index: int, block_size: int, prompt_tokens: int | None = None) -> Retention | None:
        """The retention of block ``index`` (tokens ``[index*block_size, (index+1)*block_size)``):
        the first range it overlaps, else ``decode`` when it holds only generated tokens (those at and
        after ``prompt_tokens``), else ``retention``."""
        start = index * block_size
        for end, retention in self.ranges:
            if start < end:
                return retention
        if self.decode is not None and prompt_tokens is not None and start >= prompt_tokens:
            return self.decode
        return self.retention

    def retentions(self, indices, block_size: int, prompt_tokens: int | None = None) -> list[Retention | None]:
        if not self.sets_retention:
            return [None] * len(indices)
        return [self.retention_of_block(i, block_size, prompt_tokens) for i in indices]


NO_HINTS = Hints()


def _retention(obj: Any, what: str, unknown: list[str], extra_keys: frozenset = frozenset()) -> Retention:
    if not isinstance(obj, dict):
        raise HintError(f"{what} must be an object, got {obj!r}")
    unknown += [f"{what}.{k}" for k in obj if k not in _RETENTION_KEYS and k not in extra_keys]
    cls = obj.get("class", "conversation")
    if cls not in CLASSES:
        raise HintError(f"{what}.class must be one of {', '.join(CLASSES)}, got {cls!r}")
    priority = obj.get("priority", 50)
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 100:
        raise HintError(f"{what}.priority must be an integer 0..100, got {priority!r}")
    control = obj.get("cache_control")
    try:
        ttl = parse_cache_control(control) if control is not None else None
    except ValueError as error:
        raise HintError(f"{what}.{error}") from None
    return Retention(cls, priority, ttl)


def parse_hints(obj: Any, defaults: Hints = NO_HINTS) -> tuple[Hints, list[str]]:
    """(hints, unknown keys) for a hint object over ``defaults``; raises HintError on a bad value."""
    if obj is None:
        return defaults, []
    if not isinstance(obj, dict):
        raise HintError(f"hints must be an object, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in _TOP_KEYS]
    fields: dict[str, Any] = {}
    if "retention" in obj:
        fields["retention"] = None if obj["retention"] is None else _retention(obj["retention"], "retention", unknown)
    if "ranges" in obj:
        ranges = obj["ranges"] or []
        if not isinstance(ranges, list) or len(ranges) > MAX_RANGES:
            raise HintError(f"ranges must be a list of at most {MAX_RANGES} objects, got {obj['ranges']!r}")
        end, parsed = 0, []
        for i, item in enumerate(ranges):
            what = f"ranges[{i}]"
            tokens = item.get("tokens") if isinstance(item, dict) else None
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
                raise HintError(f"{what}.tokens must be a positive integer, got {tokens!r}")
            end += tokens
            parsed.append((end, _retention(item, what, unknown, frozenset({"tokens"}))))
        fields["ranges"] = tuple(parsed)
    if "decode" in obj:
        fields["decode"] = None if obj["decode"] is None else _retention(obj["decode"], "decode", unknown)
    if "osl" in obj:
        osl = obj["osl"]
        if osl is not None and (isinstance(osl, bool) or not isinstance(osl, int) or osl < 0):
            raise HintError(f"osl must be a non-negative integer, got {osl!r}")
        fields["osl"] = osl
    if "prefetch" in obj:
        if not isinstance(obj["prefetch"], bool):
            raise HintError(f"prefetch must be true or false, got {obj['prefetch']!r}")
        fields["prefetch"] = obj["prefetch"]
    return dataclasses.replace(defaults, **fields), unknown


def to_pb(retention: Retention | None) -> pb.Retention | None:
    if retention is None:
        return None
    return pb.Retention(cls=retention.cls, priority=retention.priority, ttl_s=retention.ttl_s or 0.0)


def parse_kv_hint(obj: Any) -> str:
    """The peer named by a router's ``kv_hint`` envelope (module docstring), "" for none; raises
    HintError when the envelope is malformed."""
    if obj is None:
        return ""
    if not isinstance(obj, dict):
        raise HintError(f"kv_hint must be an object, got {type(obj).__name__}")
    version = obj.get("version", 1)
    if isinstance(version, bool) or str(version) not in ("1", "1.0"):
        raise HintError(f"kv_hint.version must be 1, got {version!r}")
    actions = obj.get("actions") or []
    if not isinstance(actions, list):
        raise HintError(f"kv_hint.actions must be a list, got {type(actions).__name__}")
    for i, action in enumerate(actions):
        kind = action.get("type") if isinstance(action, dict) else None
        if not isinstance(kind, str) or not kind.startswith(KV_FETCH_ACTION):
            continue
        source = action.get("source")
        if isinstance(source, dict):
            source = source.get("address") or source.get("node_id")
        if not isinstance(source, str) or not source.strip() or len(source) > MAX_PEER_NAME:
            raise HintError(f"kv_hint.actions[{i}].source must be a peer address or node id (a string of at "
                            f"most {MAX_PEER_NAME} characters), got {source!r}")
        return source.strip()
    return ""
