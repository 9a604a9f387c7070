"""Leases as upstream stores them: the subnet key (`10.5.52.0-24[&fd00::-64]`) and the LeaseAttrs JSON value.

The JSON is byte-identical to what flanneld writes (field order, compact form, `"PublicIPv6":null`), so a mixed cluster
of flanneld and flannel-udp nodes reads one another's leases.

An IPv6-only lease has no IPv4 subnet and, as upstream's, the zero PublicIP 0.0.0.0. Upstream's key schema cannot name
it (every key starts with an IPv4 subnet), so only the embedded store, whose schema is ours, keeps such leases, under
the IPv6 subnet alone (`fd00:10:244:1::-64`); etcd keys are parsed exactly as upstream parses them.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import re
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from .config import lookup_key

log = logging.getLogger(__name__)

IPv4Net = ipaddress.IPv4Network
IPv6Net = ipaddress.IPv6Network

# Upstream's regex, applied to the whole key path and unanchored at the start; \Z because Python's $ also matches
# before a trailing newline, and ASCII because Go's \d is ASCII-only.
_SUBNET_KEY_RE = re.compile(r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?\Z", re.ASCII)
# The embedded store's IPv6-only keys: the last path element is the IPv6 subnet alone.
_IPV6_ONLY_KEY_RE = re.compile(r"(?:\A|/)([a-f\d:]*:[a-f\d:]*)-(\d+)\Z", re.ASCII)
NO_PUBLIC_IP = ipaddress.IPv4Address(0)  # an IPv6-only lease's PublicIP, upstream's zero value


class LeaseError(ValueError):
    """A lease value that cannot be decoded."""


@dataclass(frozen=True)
class LeaseAttrs:
    public_ip: ipaddress.IPv4Address
    public_ipv6: ipaddress.IPv6Address | None = None
    backend_type: str = ""
    backend_data: Any = None  # decoded JSON, re-encoded compactly in document order
    backend_v6_data: Any = None

    def to_json(self) -> str:
        parts = [
            f'"PublicIP":{json.dumps(str(self.public_ip))}',
            f'"PublicIPv6":{json.dumps(str(self.public_ipv6)) if self.public_ipv6 is not None else "null"}',
        ]
        if self.backend_type:
            parts.append(f'"BackendType":{json.dumps(self.backend_type)}')
        if self.backend_data is not None:
            parts.append(f'"BackendData":{_compact(self.backend_data)}')
        if self.backend_v6_data is not None:
            parts.append(f'"BackendV6Data":{_compact(self.backend_v6_data)}')
        return "{" + ",".join(parts) + "}"

    @classmethod
    def from_json(cls, text: str | bytes) -> LeaseAttrs:
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise LeaseError(f"lease value is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise LeaseError("lease value is not a JSON object")
        public_ip = lookup_key(doc, "PublicIP", ...)
        if public_ip is ...:
            public_ip = "0.0.0.0"  # Go leaves the zero value when the key is absent
        try:
            v4 = ipaddress.IPv4Address(public_ip) if isinstance(public_ip, str) else None
        except ValueError:
            v4 = None
        if v4 is None:
            raise LeaseError(f"lease PublicIP is not an IPv4 address: {json.dumps(public_ip)}")
        raw6 = lookup_key(doc, "PublicIPv6")
        v6 = None
        if raw6 is not None:
            try:
                v6 = ipaddress.IPv6Address(raw6) if isinstance(raw6, str) else None
            except ValueError:
                v6 = None
            if v6 is None:
                raise LeaseError(f"lease PublicIPv6 is not an IPv6 address: {json.dumps(raw6)}")
        backend_type = lookup_key(doc, "BackendType", "") or ""
        if not isinstance(backend_type, str):
            raise LeaseError("lease BackendType is not a string")
        return cls(v4, v6, backend_type, lookup_key(doc, "BackendData"), lookup_key(doc, "BackendV6Data"))


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def make_subnet_key(subnet: IPv4Net | None, ipv6_subnet: IPv6Net | None = None) -> str:
    """`10.5.52.0-24`, `10.5.52.0-24&fd00::-64`, or for an IPv6-only lease (embedded store only) `fd00::-64`."""
    if subnet is None:
        if ipv6_subnet is None:
            raise ValueError("a lease key needs a subnet")
        return f"{ipv6_subnet.network_address}-{ipv6_subnet.prefixlen}"
    key = f"{subnet.network_address}-{subnet.prefixlen}"
    if ipv6_subnet is not None:
        key += f"&{ipv6_subnet.network_address}-{ipv6_subnet.prefixlen}"
    return key


@functools.lru_cache(maxsize=8192)
def parse_subnet_key(key: str, ipv6_only: bool = False) -> tuple[IPv4Net | None, IPv6Net | None] | None:
    """The subnet(s) named by a key or a full key path; None for a key upstream would ignore. ipv6_only: also take
    the embedded store's IPv6-only keys. Cached (the result is immutable): every watching node parses each removal's
    key, and parsing the addresses was a fifth of a node's CPU while 100 of 1,000 nodes left."""
    m = _SUBNET_KEY_RE.search(key)
    if m is None:
        return _parse_ipv6_only_key(key) if ipv6_only else None
    try:
        v4_ip = ipaddress.IPv4Address(m.group(1))
        v4_len = int(m.group(2))
        if v4_len > 31:  # upstream parses the length as a 5-bit number: -32 is rejected
            return None
        subnet = ipaddress.IPv4Network((v4_ip, v4_len))  # strict: a key with host bits set is ignored
        if m.group(3) is None:
            return subnet, None
        v6_ip = ipaddress.IPv6Address(m.group(3))
        v6_len = int(m.group(4))
        if v6_len > 127:  # 7-bit, as upstream
            return None
        return subnet, ipaddress.IPv6Network((v6_ip, v6_len))
    except ValueError:
        return None


def _parse_ipv6_only_key(key: str) -> tuple[None, IPv6Net] | None:
    m = _IPV6_ONLY_KEY_RE.search(key)
    if m is None or int(m.group(2)) > 127:
        return None
    try:
        return None, ipaddress.IPv6Network((ipaddress.IPv6Address(m.group(1)), int(m.group(2))))
    except ValueError:
        return None


Subnet = IPv4Net | IPv6Net


@dataclass(frozen=True)
class Lease:
    subnet: IPv4Net | None  # None in an IPv6-only network
    attrs: LeaseAttrs
    ipv6_subnet: IPv6Net | None = None
    expiration: float | None = None  # epoch seconds; None = a reservation that never expires

    @property
    def key(self) -> str:
        return make_subnet_key(self.subnet, self.ipv6_subnet)

    @property
    def primary(self) -> Subnet:
        """What names the lease among its peers: its IPv4 subnet, or in an IPv6-only network its IPv6 one."""
        return primary_subnet(self.subnet, self.ipv6_subnet)

    def seconds_left(self, now: float | None = None) -> float | None:
        if self.expiration is None:
            return None
        return self.expiration - (time.time() if now is None else now)


class EventType(Enum):
    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True)
class LeaseAdded:
    """A lease added or changed."""

    lease: Lease
    type: ClassVar[EventType] = EventType.ADDED

    @property
    def subnet(self) -> IPv4Net | None:
        return self.lease.subnet

    @property
    def ipv6_subnet(self) -> IPv6Net | None:
        return self.lease.ipv6_subnet

    @property
    def primary(self) -> Subnet:
        return self.lease.primary


@dataclass(frozen=True)
class LeaseRemoved:
    """A lease gone, named by its key only: a store has no more to report (a deleted or expired key has no value),
    and every backend keys its state by the subnets."""

    subnet: IPv4Net | None
    ipv6_subnet: IPv6Net | None = None
    type: ClassVar[EventType] = EventType.REMOVED

    @property
    def primary(self) -> Subnet:
        return primary_subnet(self.subnet, self.ipv6_subnet)


def primary_subnet(subnet: IPv4Net | None, ipv6_subnet: IPv6Net | None) -> Subnet:
    if subnet is not None:
        return subnet
    if ipv6_subnet is None:
        raise ValueError("a lease without any subnet")
    return ipv6_subnet


LeaseEvent = LeaseAdded | LeaseRemoved


@dataclass(frozen=True)
class Snapshot:
    """Every lease at one store revision."""

    leases: list[Lease]
    revision: int


@dataclass(frozen=True)
class Events:
    """Changes since the previous result, in store order."""

    events: list[LeaseEvent] = field(default_factory=list)
    revision: int = 0


@functools.lru_cache(maxsize=8192)
def decode_or_warn(
    key: str, value: str | bytes | None, expires: float | None, ipv6_only: bool = False
) -> LeaseEvent | None:
    """A stored key as a lease event: its lease (LeaseAdded), or with value None its removal (LeaseRemoved); None,
    with upstream's warning, for a key or value that does not parse: a hostile store never stops a watch. ipv6_only:
    the store may hold IPv6-only keys (the embedded store)."""
    try:
        if value is None:
            subnets = parse_subnet_key(key, ipv6_only)
            if subnets is None:
                raise LeaseError(f"bad subnet key {key!r}")
            return LeaseRemoved(*subnets)
        return LeaseAdded(lease_from_kv(key, value, expires, ipv6_only))
    except LeaseError as e:
        log.warning("Ignoring bad subnet node %s: %s", key, e)
        return None


def lease_from_kv(key: str, value: str | bytes, expiration: float | None, ipv6_only: bool = False) -> Lease:
    """Decode one stored key/value; raises LeaseError for anything upstream would skip.

    Every listing, every retry of an acquisition and every watcher decode the same keys and values again: each is
    decoded once (leases are immutable; a cluster-wide start of 1,000 nodes spent most of its time here). LeaseErrors
    are not cached: they are rare."""
    subnets = parse_subnet_key(key, ipv6_only)
    if subnets is None:
        raise LeaseError(f"bad subnet key {key!r}")
    subnet, ipv6_subnet = subnets
    attrs = LeaseAttrs.from_json(value)
    if subnet is None and attrs.public_ipv6 is None:
        raise LeaseError(f"IPv6-only lease {key!r} has no PublicIPv6")
    return Lease(subnet, attrs, ipv6_subnet, expiration)
