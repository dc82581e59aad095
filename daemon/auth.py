"""Who is calling, and what they may see: principals for the client API (docs/security.md).

Contract
- On the Unix socket a caller is known by its uid, effective gid and supplementary groups, read by
  the kernel (SO_PEERCRED, SO_PEERGROUPS) when it opens a local session (daemon/sessions.py):
  `LocalIdentities` maps a configured uid or gid to its tenant ([[tenant]] uids/gids) or to the
  administrators (server.admin_uids/admin_gids; when both are empty, the daemon's own uid and root).
  Precedence: the uid, then the effective gid, then the supplementary groups; supplementary groups
  that name more than one principal are refused (IdentityConflict), never settled by order. Any
  other local user is refused. A local principal may use the shared-memory arena: its tenant's own
  part.
- On TCP a caller presents `authorization: Bearer <token>`. The daemon keeps only SHA-256 digests
  of tokens (server.tokens_file), each bound to one tenant or marked admin, optionally expiring.
- A tenant's namespaces are the names that start with "<tenant>/". A tenant principal can read,
  write, list and watch only those; admin calls (Stats, Clear "*", unscoped operator views of
  other tenants) need an admin principal.
- Tokens never appear in logs, metrics or errors; a token is named by its `id` only.
- A principal carries its token's expiry: a call checks it once, at its start, but a long-lived
  stream (Watch) must check `expired()` as it goes (the service ends it UNAUTHENTICATED).
Thread-safety: immutable after load; a reload builds a new TokenTable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import time
import tomllib

_TENANT_RE = re.compile(r"[A-Za-z0-9._\-]{1,64}")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
MAX_TOKENS = 4096


class AuthConfigError(ValueError):
    """The tokens file is invalid; the message names the entry (never the secret)."""


@dataclasses.dataclass(frozen=True)
class Principal:
    name: str                  # for logs: "uid 1001" or "token <id>"
    tenant: str | None = None  # None: an administrator, who sees every namespace
    expires_unix: float = 0.0  # the token's expiry (time.time() seconds); 0: never
    local: bool = False        # came through a local session: may map its tenant's arena part

    def expired(self, now: float | None = None) -> bool:
        """True once the token this principal presented is past its expiry (never for 0)."""
        return bool(self.expires_unix) and (time.time() if now is None else now) >= self.expires_unix

    @property
    def admin(self) -> bool:
        return self.tenant is None

    def owns(self, namespace: str) -> bool:
        return self.tenant is None or namespace.startswith(self.tenant + "/")


LOCAL = Principal("local", local=True)  # the daemon's own calls and in-process tests


class IdentityConflict(ValueError):
    """A local user's supplementary groups name more than one principal; the message says which."""


class LocalIdentities:
    """Local users (uid, effective gid and supplementary groups, as the kernel reports them) to
    principals. In order, the first step that names anyone decides:

    1. the uid: an administrator uid, else a tenant's uid;
    2. the effective gid: an administrator gid, else a tenant's gid;
    3. the supplementary groups: every principal they name (the administrators count as one). Exactly
       one: that principal. More than one: IdentityConflict. Picking one by list order would let the
       order of a user's groups (which the daemon does not control) choose the tenant.

    A user in two tenants' groups chooses by the effective gid its engine runs with (`sg`, systemd's
    Group=); config validation keeps every uid and gid to one principal."""

    def __init__(self, admin_uids, admin_gids, tenants, own_uid: int):
        self._admin_uids = set(admin_uids) or ({own_uid, 0} if not admin_gids else set())
        self._admin_gids = set(admin_gids)
        self._uid_tenant = {uid: t.name for t in tenants for uid in t.uids}
        self._gid_tenant = {gid: t.name for t in tenants for gid in t.gids}

    def resolve(self, uid: int, gid: int, groups=()) -> Principal | None:
        """The principal of a local user; None when the configuration names it nowhere. Raises
        IdentityConflict when only its supplementary groups match, and they match several principals."""
        return self.identify(uid, gid, groups)[0]

    def identify(self, uid: int, gid: int, groups=()) -> tuple[Principal | None, str]:
        """(principal or None, what matched: "uid", "gid 500" or "supplementary gid 500"); see resolve."""
        name = f"uid {uid}"
        if uid in self._admin_uids:
            return Principal(name, None, local=True), "uid"
        if uid in self._uid_tenant:
            return Principal(name, self._uid_tenant[uid], local=True), "uid"
        matched = self._by_gid(gid)
        if matched is not False:
            return Principal(name, matched, local=True), f"gid {gid}"
        found: dict[str | None, int] = {}  # principal's tenant (None: the administrators) -> first gid
        for group in sorted(set(groups)):
            matched = self._by_gid(group)
            if matched is not False:
                found.setdefault(matched, group)
        if len(found) > 1:
            named = ", ".join(f"gid {g} ({'the administrators' if t is None else f'tenant {t}'})"
                              for t, g in sorted(found.items(), key=lambda item: item[1]))
            raise IdentityConflict(f"uid {uid}: its supplementary groups name more than one principal: {named}; "
                                   "run its engine with the wanted group as its effective gid (sg, Group=), or "
                                   "drop it from the other group")
        if found:
            (tenant, group), = found.items()
            return Principal(name, tenant, local=True), f"supplementary gid {group}"
        return None, ""

    def _by_gid(self, gid: int):
        """The tenant a gid belongs to, None for the administrators, False for nobody."""
        if gid in self._admin_gids:
            return None
        return self._gid_tenant.get(gid, False)


@dataclasses.dataclass(frozen=True)
class _Token:
    id: str
    digest: bytes
    tenant: str | None
    expires_unix: float  # 0 = never


class TokenTable:
    """Bearer-token digests from a TOML file of `[[token]]` entries:

        [[token]]
        id = "team-a-engines"           # named in logs
        sha256 = "<hex digest of the token>"
        tenant = "team-a"               # or admin = true (and no tenant)
        expires_unix = 1798761600       # optional
    """

    def __init__(self, tokens: list[_Token]):
        self._tokens = tokens

    @classmethod
    def load(cls, path: str) -> "TokenTable":
        try:
            with open(path, "rb") as file:
                table = tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise AuthConfigError(f"tokens file {path}: {exc}") from exc
        entries = table.get("token", [])
        if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_TOKENS:
            raise AuthConfigError(f"tokens file {path}: needs 1..{MAX_TOKENS} [[token]] entries")
        tokens = [_parse_entry(entry, index) for index, entry in enumerate(entries)]
        if len({t.id for t in tokens}) != len(tokens):
            raise AuthConfigError(f"tokens file {path}: token ids must be unique")
        return cls(tokens)

    def resolve(self, authorization: str, now: float | None = None) -> Principal | None:
        """The principal of an `authorization` header value; None if unknown or expired."""
        if not authorization.startswith("Bearer "):
            return None
        digest = hashlib.sha256(authorization[7:].strip().encode()).digest()
        now = time.time() if now is None else now
        for token in self._tokens:  # compare every entry in constant time; no early exit on a match
            if hmac.compare_digest(digest, token.digest):
                principal = Principal(f"token {token.id}", token.tenant, token.expires_unix)
                return None if principal.expired(now) else principal
        return None

    def __len__(self) -> int:
        return len(self._tokens)


def _parse_entry(entry, index: int) -> _Token:
    where = f"[[token]] #{index + 1}"
    if not isinstance(entry, dict):
        raise AuthConfigError(f"{where}: expected a table")
    unknown = set(entry) - {"id", "sha256", "tenant", "admin", "expires_unix"}
    if unknown:
        raise AuthConfigError(f"{where}: unknown keys {sorted(unknown)}")
    token_id, digest = entry.get("id"), entry.get("sha256", "")
    if not isinstance(token_id, str) or not _TENANT_RE.fullmatch(token_id):
        raise AuthConfigError(f"{where}: id must be 1..64 characters of [A-Za-z0-9._-]")
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise AuthConfigError(f"{where} ({token_id}): sha256 must be 64 lowercase hex digits "
                              "(sha256sum of the token, not the token itself)")
    admin, tenant = entry.get("admin", False), entry.get("tenant")
    if admin is not True and admin is not False:
        raise AuthConfigError(f"{where} ({token_id}): admin must be true or false")
    if admin == (tenant is not None):
        raise AuthConfigError(f"{where} ({token_id}): set exactly one of tenant = \"...\" or admin = true")
    if tenant is not None and (not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant)):
        raise AuthConfigError(f"{where} ({token_id}): tenant must be 1..64 characters of [A-Za-z0-9._-]")
    expires = entry.get("expires_unix", 0)
    if isinstance(expires, bool) or not isinstance(expires, (int, float)) or expires < 0:
        raise AuthConfigError(f"{where} ({token_id}): expires_unix must be a non-negative number")
    return _Token(token_id, bytes.fromhex(digest), tenant, float(expires))


def token_digest(token: str) -> str:
    """The sha256 value a tokens file stores for `token` (what `kvtier token-digest` prints)."""
    return hashlib.sha256(token.strip().encode()).hexdigest()
