"""Who may associate and use which service, and how often: pure decisions, no I/O.

The acceptor asks `AccessPolicy` once per A-ASSOCIATE-RQ (calling AE title, peer address,
User Identity) and once per DIMSE request (may this AE use this service?), and asks
`Admission` whether the per-AE and per-address limits leave room. Every answer is either
None (go ahead) or a `Refusal` naming why, with the A-ASSOCIATE-RJ values to send
(PS3.8 9.3.4 Table 9-21); the caller logs and counts it. Clocks are passed in.
"""

from __future__ import annotations

import functools
import ipaddress
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from pynetdicom.pdu_primitives import UserIdentityNegotiation

from minipacs.net import negotiation as neg
from minipacs.net.commands import C_ECHO_RQ, C_FIND_RQ, C_GET_RQ, C_MOVE_RQ, C_STORE_RQ
from minipacs.passwords import hash_password, verify_password

# The services access rules name, by the Command Field of their request.
SERVICE_NAMES: Final = {
    C_ECHO_RQ: "echo",
    C_STORE_RQ: "store",
    C_FIND_RQ: "find",
    C_MOVE_RQ: "move",
    C_GET_RQ: "get",
}
SERVICES: Final = tuple(SERVICE_NAMES.values())
# What to do with a calling AE title that has no [access.<AE>] rule.
UNKNOWN_AE_POLICIES: Final = ("allow", "refuse-association", "refuse-services")
USER_IDENTITY_MODES: Final = ("off", "optional", "required")
# PS3.7 D.3.3.7.1 User-Identity-Type: 1 username, 2 username and passcode.
USERNAME: Final = 1
USERNAME_AND_PASSCODE: Final = 2

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why something was refused (short, for logs and metrics) and the RJ values to send."""

    why: str
    result: tuple[int, int, int] = neg.REJECT_CALLING_AE


@dataclass(frozen=True, slots=True)
class Identity:
    """A User Identity sub-item of an A-ASSOCIATE-RQ (PS3.7 D.3.3.7.1)."""

    kind: int
    primary: bytes
    secondary: bytes = b""
    positive_response_requested: bool = False


@dataclass(frozen=True)
class AeRule:
    """[access.<AE>]: the services an AE may use, from where, how many at once (0: any)."""

    services: frozenset[str] = frozenset(SERVICES)
    networks: tuple[Network, ...] = ()
    max_associations: int = 0


def parse_networks(hosts: Sequence[str]) -> tuple[Network, ...]:
    """Addresses and CIDR blocks ("10.1.0.0/16") as networks; raise ValueError."""
    return tuple(ipaddress.ip_network(host, strict=False) for host in hosts)


# PS3.7 D.3.3.7: an association refused for its user identity is rejected-permanent by
# the UL service provider, ACSE related function, no reason given.
REJECT_IDENTITY: Final = (1, 2, 1)


@dataclass(frozen=True)
class AccessPolicy:
    """Access rules by calling AE title, the policy for unknown AEs, and known users."""

    rules: Mapping[str, AeRule] = field(default_factory=dict)
    unknown_ae: str = "allow"
    user_identity: str = "off"
    # Username -> salted scrypt hash (minipacs.passwords).
    users: Mapping[str, str] = field(default_factory=dict)

    def association_refusal(self, calling_ae: str, host: str) -> Refusal | None:
        """Why an A-ASSOCIATE-RQ from calling_ae at host must be rejected, or None."""
        rule = self.rules.get(calling_ae)
        if rule is None and self.unknown_ae == "refuse-association":
            return Refusal("calling AE title")
        if rule is not None and rule.networks and not _within(host, rule.networks):
            # Same reason as an unknown AE: a title is only recognised from its hosts.
            return Refusal("peer address")
        return None

    @property
    def checks_identity(self) -> bool:
        """True when User Identity items are checked (mode optional or required)."""
        return self.user_identity != "off"

    def identity_refusal(self, identity: Identity | None) -> Refusal | None:
        """Why this User Identity (None: none sent) fails the configured mode (blocking)."""
        if not self.checks_identity:
            return None
        if identity is None:
            required = self.user_identity == "required"
            return Refusal("user identity missing", REJECT_IDENTITY) if required else None
        if identity.kind not in (USERNAME, USERNAME_AND_PASSCODE):
            # Kerberos, SAML and JWT (types 3-5) cannot be checked here.
            return Refusal("user identity type not supported", REJECT_IDENTITY)
        stored = self.users.get(identity.primary.decode("utf-8", "replace"))
        if stored is None:
            if identity.kind == USERNAME_AND_PASSCODE:
                # As slow as a known user's check: timing tells no one which names exist.
                verify_password(identity.secondary, _decoy_hash())
            return Refusal("user identity unknown", REJECT_IDENTITY)
        if identity.kind == USERNAME_AND_PASSCODE and not verify_password(
            identity.secondary, stored
        ):
            return Refusal("user identity passcode", REJECT_IDENTITY)
        return None

    def confirms_identity(self, identity: Identity | None) -> bool:
        """True if our A-ASSOCIATE-AC carries a User Identity response (PS3.7 D.3.3.7.2)."""
        return (
            self.checks_identity and identity is not None and identity.positive_response_requested
        )

    @property
    def open_to_all(self) -> bool:
        """True when every calling AE may use every service (no rules, unknown allowed)."""
        return not self.rules and self.unknown_ae == "allow"

    def allows(self, calling_ae: str, service: str) -> bool:
        """True if calling_ae may use service (echo, store, find, move, get)."""
        rule = self.rules.get(calling_ae)
        if rule is None:
            return self.unknown_ae == "allow"
        return service in rule.services


@functools.cache
def _decoy_hash() -> str:
    return hash_password(secrets.token_hex(16))


def peer_identity(user_information: Iterable[object]) -> Identity | None:
    """The User Identity sub-item of an A-ASSOCIATE-RQ's user information, if any."""
    for item in user_information:
        if isinstance(item, UserIdentityNegotiation) and item.user_identity_type is not None:
            return Identity(
                int(item.user_identity_type),
                item.primary_field or b"",
                item.secondary_field or b"",
                bool(item.positive_response_requested),
            )
    return None


def _within(host: str, networks: Sequence[Network]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks if network.version == address.version)


def peer_host(peer: str) -> str:
    """The address part of an "address:port" peer label (IPv6 keeps its colons)."""
    return peer.rpartition(":")[0]


class RateLimiter:
    """A token bucket per key: at most `per_minute` events a minute, in bursts up to that."""

    def __init__(self, per_minute: int, clock: Callable[[], float], max_keys: int = 65536) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str) -> bool:
        """Take one token for key; False if its bucket is empty."""
        now = self.clock()
        capacity = float(self.per_minute)
        tokens, since = self._buckets.get(key, (capacity, now))
        tokens = min(capacity, tokens + (now - since) * capacity / 60.0)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self.max_keys:
            self._prune(now)
        return True

    def _prune(self, now: float) -> None:
        # Buckets that have refilled are the same as absent ones: memory stays bounded
        # under a spoofed-source flood as long as the limit refills within a minute.
        full = [
            key
            for key, (tokens, since) in self._buckets.items()
            if tokens + (now - since) * self.per_minute / 60.0 >= self.per_minute
        ]
        for key in full:
            del self._buckets[key]


@dataclass
class Admission:
    """The stateful limits of association admission: per calling AE and per peer address."""

    policy: AccessPolicy
    max_per_ae: int
    per_minute_per_host: int
    clock: Callable[[], float]
    _active: dict[str, int] = field(default_factory=dict)
    _rate: RateLimiter | None = None

    def __post_init__(self) -> None:
        if self.per_minute_per_host:
            self._rate = RateLimiter(self.per_minute_per_host, self.clock)

    def rate_refusal(self, host: str) -> Refusal | None:
        """Take one A-ASSOCIATE-RQ from host off its rate; a Refusal if none is left."""
        if self._rate is not None and not self._rate.allow(host):
            return Refusal("association rate", neg.REJECT_LOCAL_LIMIT)
        return None

    def limit_refusal(self, calling_ae: str) -> Refusal | None:
        """Why calling_ae may not have one more association at once, or None."""
        rule = self.policy.rules.get(calling_ae)
        limit = (rule.max_associations if rule is not None else 0) or self.max_per_ae
        if limit and self._active.get(calling_ae, 0) >= limit:
            return Refusal("calling AE association limit", neg.REJECT_LOCAL_LIMIT)
        return None

    def opened(self, calling_ae: str) -> None:
        """Count an established association of calling_ae."""
        self._active[calling_ae] = self._active.get(calling_ae, 0) + 1

    def closed(self, calling_ae: str) -> None:
        """Forget an established association of calling_ae."""
        left = self._active.get(calling_ae, 0) - 1
        if left > 0:
            self._active[calling_ae] = left
        else:
            self._active.pop(calling_ae, None)


class Gate(Protocol):
    """Admission as the acceptor asks for it: in this process, or for several (workers)."""

    async def rate_refusal(self, host: str) -> Refusal | None:
        """Take one A-ASSOCIATE-RQ from host off its rate; a Refusal if none is left."""
        ...

    async def admit(self, calling_ae: str) -> Refusal | None:
        """Count one more association of calling_ae, or say why it may not have one."""
        ...

    def release(self, calling_ae: str) -> None:
        """Forget an association admit() counted."""
        ...


@dataclass
class LocalGate:
    """The Gate of one process: the association limit and Admission's, counted here."""

    admission: Admission
    max_associations: int
    active: int = 0

    async def rate_refusal(self, host: str) -> Refusal | None:
        """Admission.rate_refusal."""
        return self.admission.rate_refusal(host)

    async def admit(self, calling_ae: str) -> Refusal | None:
        """admit_now: it never suspends, so the counts read are the counts updated."""
        return self.admit_now(calling_ae)

    def admit_now(self, calling_ae: str) -> Refusal | None:
        """Check the total and calling_ae's limits, and count the association if it fits."""
        if self.active >= self.max_associations:
            return Refusal("association limit", neg.REJECT_LOCAL_LIMIT)
        refusal = self.admission.limit_refusal(calling_ae)
        if refusal is not None:
            return refusal
        self.admission.opened(calling_ae)
        self.active += 1
        return None

    def release(self, calling_ae: str) -> None:
        """Forget one association of calling_ae."""
        self.admission.closed(calling_ae)
        self.active -= 1
