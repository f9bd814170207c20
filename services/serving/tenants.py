"""API keys and tenants: who a gateway call is from, and how much that tenant may ask for. JAX-free.

    tenants = Tenants.from_file("keys.txt")          # `sdmesh serve gateway --api-keys keys.txt`
    tenant = tenants.authenticate(metadata)          # Unauthenticated without a known key
    with tenants.admit(tenant):                      # QuotaExceeded past its requests in flight or its rate
        ...                                          # (or tenants.acquire(tenant) … tenants.release(tenant))

The keys file has one key per line; blank lines and lines starting with # are skipped. A line may
name the key's tenant and limits after the key, separated by spaces:

    sk-3f9a...                                   a key of its own tenant (named by the key's hash)
    sk-81bc... acme                              a key of tenant "acme" (several keys may share one)
    sk-0d2e... acme inflight=4 rate=0.5 burst=3  at most 4 requests in flight; 0.5 requests/s, bursts of 3

A tenant's limits are those on its first line that sets them. `inflight` defaults to half the
gateway's --max-inflight, so no one tenant can hold all of it; `rate` defaults to none; `burst`
to max(1, rate). Keys travel as gRPC metadata `authorization: Bearer KEY` (or `x-api-key: KEY`)
and are compared in constant time; they are never logged (a tenant named after its key is named
by a prefix of the key's SHA-256).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import math
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

OPEN = "default"  # the one tenant of a gateway without --api-keys


class Unauthenticated(Exception):
    """No API key, or one the gateway does not know (UNAUTHENTICATED)."""


class QuotaExceeded(Exception):
    """The tenant is past its requests in flight or its rate (RESOURCE_EXHAUSTED); `retry_after` in seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class Limits:
    inflight: int | None = None  # requests at once; None: the gateway's default share
    rate: float | None = None  # requests per second, sustained; None: unlimited
    burst: float | None = None  # requests at once above the rate; None: max(1, rate)


class TokenBucket:
    """`rate` tokens a second up to `burst`; each request takes one."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.stamp = burst, clock()

    def take(self) -> float:
        """0 if a token was taken, else the seconds until one will be there."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Tenant:
    """One tenant's limits and its live counts."""

    def __init__(self, name: str, limits: Limits, default_inflight: int | None):
        self.name = name
        self.inflight_limit = limits.inflight or default_inflight  # None: only the gateway's --max-inflight
        self.bucket = TokenBucket(limits.rate, limits.burst or max(1.0, limits.rate)) if limits.rate else None
        self.inflight = 0

    def __repr__(self) -> str:
        return f"Tenant({self.name!r})"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_from_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The API key a call carries: `authorization: Bearer KEY` or `x-api-key: KEY`; None without one."""
    for name, value in metadata or ():
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if name.lower() == "authorization" and text[:7].lower() == "bearer ":
            return text[7:].strip()
        if name.lower() == "x-api-key":
            return text.strip()
    return None


class Tenants:
    """The keys a gateway accepts and their tenants; `open()` for a gateway without keys (one tenant, no key)."""

    def __init__(self, keys: dict[bytes, str], limits: dict[str, Limits], *, default_inflight: int | None):
        self.required = bool(keys)
        self._keys = keys  # SHA-256 of the key → tenant name
        self._lock = threading.Lock()
        self.tenants = {name: Tenant(name, limits.get(name, Limits()), default_inflight) for name in limits}
        if not self.required:
            self.tenants = {OPEN: Tenant(OPEN, Limits(), default_inflight)}

    @classmethod
    def open(cls) -> Tenants:
        """No keys: every caller is the one tenant OPEN, bound only by the gateway's own --max-inflight."""
        return cls({}, {}, default_inflight=None)

    @classmethod
    def from_file(cls, path: str | Path, *, max_inflight: int) -> Tenants:
        """Parse a keys file (the module docstring has its format); ValueError naming the line when it is wrong."""
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"--api-keys {path}: cannot read it ({e.strerror})") from None
        keys: dict[bytes, str] = {}
        limits: dict[str, Limits] = {}
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            key, rest = fields[0], fields[1:]
            name = rest.pop(0) if rest and "=" not in rest[0] else f"key-{_digest(key).hex()[:8]}"
            try:
                given = _limits(rest)
            except ValueError as e:
                raise ValueError(f"--api-keys {path}, line {number}: {e}") from None
            digest = _digest(key)
            if digest in keys:
                raise ValueError(f"--api-keys {path}, line {number}: the same key is listed twice")
            keys[digest] = name
            if name not in limits or (limits[name] == Limits() and given != Limits()):
                limits[name] = given
        if not keys:
            raise ValueError(f"--api-keys {path}: no keys in it (one key per line)")
        return cls(keys, limits, default_inflight=max(1, max_inflight // 2))

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Tenant:
        if not self.required:
            return self.tenants[OPEN]
        key = key_from_metadata(metadata)
        if not key:
            raise Unauthenticated(
                "this gateway needs an API key: send metadata 'authorization: Bearer KEY' (--api-key in the CLI, "
                "api_key= in the Python client)"
            )
        digest, found = _digest(key), None
        for known, name in self._keys.items():  # every key compared, in constant time each: timing tells nothing
            if hmac.compare_digest(digest, known):
                found = name
        if found is None:
            raise Unauthenticated("the API key is not one this gateway knows; check it, or ask its operator for one")
        return self.tenants[found]

    @contextlib.contextmanager
    def admit(self, tenant: Tenant) -> Iterator[None]:
        """Hold one of the tenant's places for the block; QuotaExceeded past its limits."""
        self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)

    def acquire(self, tenant: Tenant) -> None:
        """Take one of the tenant's places (give it back with `release`); QuotaExceeded past its limits."""
        with self._lock:
            if tenant.inflight_limit is not None and tenant.inflight >= tenant.inflight_limit:
                raise QuotaExceeded(
                    f"tenant {tenant.name!r} has {tenant.inflight} requests in flight, its limit; "
                    "wait for one to finish and retry",
                    retry_after=1.0,
                )
            bucket = tenant.bucket
            wait = bucket.take() if bucket is not None else 0.0
            if bucket is not None and wait:
                raise QuotaExceeded(
                    f"tenant {tenant.name!r} is past its rate of {bucket.rate:g} requests/s; retry in {wait:.1f}s",
                    retry_after=wait,
                )
            tenant.inflight += 1

    def release(self, tenant: Tenant) -> None:
        with self._lock:
            tenant.inflight -= 1


def _limits(fields: list[str]) -> Limits:
    values: dict[str, float] = {}
    for field in fields:
        name, _, value = field.partition("=")
        if name not in ("inflight", "rate", "burst") or not value:
            raise ValueError(f"expected KEY [TENANT] [inflight=N] [rate=R] [burst=B]; got {field!r}")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number <= 0 or (name == "inflight" and number != int(number)):
            raise ValueError(f"{name} must be a positive {'whole ' if name == 'inflight' else ''}number; got {value!r}")
        values[name] = number
    return Limits(
        inflight=int(values["inflight"]) if "inflight" in values else None,
        rate=values.get("rate"),
        burst=values.get("burst"),
    )


def retry_after_header(seconds: float) -> str:
    """Whole seconds, at least 1, as HTTP's Retry-After (and our `retry-after` trailing metadata) take them."""
    return str(max(1, math.ceil(seconds)))
