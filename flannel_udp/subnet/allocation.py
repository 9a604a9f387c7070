"""Which subnet a node gets (upstream tryAcquireLease), as a pure decision over the current leases.

Order, as upstream: reuse the lease that carries our public IP if it still fits the config (else delete it); else the
previous subnet from subnet.env if it is still free and fits; else the node's home subnet if it is free; else a random
free subnet. In an IPv6-only network (the embedded store's own schema) the same order holds for the IPv6 subnet alone,
with the node known by its PublicIPv6. Upstream picks at random among the first 100 free candidates, so N nodes starting
together collide about N/100 times each and retry. Here each node first tries its home: the subnet whose ordinal in
SubnetMin..SubnetMax is its public IP modulo the number of subnets. Nodes numbered consecutively in one underlay (the
usual cluster) have distinct homes however full the range is, and a node whose lease is gone (expired while it was down,
or given back) gets the same subnet again while it is free. When the home is taken, the pick is uniform over the whole
range: nodes with scattered IPs then collide as random picks do, seldom while the range is roomy.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from typing import TypeVar

from .config import NetworkConfig
from .lease import IPv4Net, IPv6Net, Lease

MAX_CANDIDATES = 100  # when random draws keep hitting taken subnets (a nearly full range): upstream's way
RANDOM_DRAWS = 64


class OutOfSubnets(RuntimeError):
    def __init__(self) -> None:
        super().__init__("out of subnets")


@dataclass(frozen=True)
class Decision:
    subnet: IPv4Net | None  # None in an IPv6-only network
    ipv6_subnet: IPv6Net | None
    reuse: Lease | None  # the existing lease to refresh, or None to create a new key
    delete: tuple[Lease, ...] = ()  # incompatible leases of ours to remove first


def is_compatible(cfg: NetworkConfig, subnet: IPv4Net | None, ipv6_subnet: IPv6Net | None) -> bool:
    if not cfg.enable_ipv4:
        if subnet is not None:
            return False
    else:
        assert cfg.subnet_min is not None and cfg.subnet_max is not None  # a checked config has its bounds
        if subnet is None or not (
            cfg.subnet_min <= subnet.network_address <= cfg.subnet_max and subnet.prefixlen == cfg.subnet_len
        ):
            return False
    if not cfg.enable_ipv6:
        return ipv6_subnet is None
    assert cfg.ipv6_subnet_min is not None and cfg.ipv6_subnet_max is not None
    return (
        ipv6_subnet is not None
        and cfg.ipv6_subnet_min <= ipv6_subnet.network_address <= cfg.ipv6_subnet_max
        and ipv6_subnet.prefixlen == cfg.ipv6_subnet_len
    )


def decide(
    cfg: NetworkConfig,
    leases: list[Lease],
    public_ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    previous: tuple[IPv4Net | None, IPv6Net | None] = (None, None),
    rng: random.Random | None = None,
) -> Decision:
    """public_ip: the node's PublicIP, or in an IPv6-only network its PublicIPv6."""
    rng = rng or random.Random()
    delete: list[Lease] = []
    mine = next((lease for lease in leases if public_ip in (lease.attrs.public_ip, lease.attrs.public_ipv6)), None)
    if mine is not None and public_ip.version == 6 and mine.subnet is not None:
        mine = None  # a dual-stack lease of this node's IPv6 underlay is another node's (its PublicIP names it)
    if mine is not None:
        if is_compatible(cfg, mine.subnet, mine.ipv6_subnet):
            return Decision(mine.subnet, mine.ipv6_subnet, reuse=mine)
        delete.append(mine)
        leases = [lease for lease in leases if lease is not mine]

    if not cfg.enable_ipv4:
        return _decide_ipv6_only(cfg, leases, int(public_ip), previous[1], rng, tuple(delete))
    prev4, prev6 = previous
    if prev4 is not None and all(lease.subnet != prev4 for lease in leases):
        prev6_ok = prev6 if cfg.enable_ipv6 else None
        if is_compatible(cfg, prev4, prev6_ok):
            return Decision(prev4, prev6_ok, reuse=None, delete=tuple(delete))

    assert cfg.subnet_min is not None and cfg.subnet_max is not None  # a checked config has its bounds
    subnet = _pick_free(
        [lease.subnet for lease in leases if lease.subnet is not None],
        int(cfg.subnet_min),
        int(cfg.subnet_max),
        cfg.subnet_len,
        ipaddress.IPv4Network,
        int(public_ip),
        rng,
    )
    ipv6_subnet = _pick_free_ipv6(cfg, leases, int(public_ip), rng) if cfg.enable_ipv6 else None
    return Decision(subnet, ipv6_subnet, reuse=None, delete=tuple(delete))


def _decide_ipv6_only(
    cfg: NetworkConfig, leases: list[Lease], home: int, prev6: IPv6Net | None, rng: random.Random, delete: tuple
) -> Decision:
    if prev6 is not None and all(lease.ipv6_subnet != prev6 for lease in leases) and is_compatible(cfg, None, prev6):
        return Decision(None, prev6, reuse=None, delete=delete)
    return Decision(None, _pick_free_ipv6(cfg, leases, home, rng), reuse=None, delete=delete)


def _pick_free_ipv6(cfg: NetworkConfig, leases: list[Lease], home: int, rng: random.Random) -> IPv6Net:
    assert cfg.ipv6_subnet_min is not None and cfg.ipv6_subnet_max is not None  # a checked config has its bounds
    return _pick_free(
        [lease.ipv6_subnet for lease in leases if lease.ipv6_subnet is not None],
        int(cfg.ipv6_subnet_min),
        int(cfg.ipv6_subnet_max),
        cfg.ipv6_subnet_len,
        ipaddress.IPv6Network,
        home,
        rng,
    )


class _Taken:
    """Overlap test of candidate subnets (given by their first address, as an int) against the taken subnets: a
    candidate overlaps a taken net iff one contains the other. Longer taken nets are folded to the candidate that
    holds them; shorter ones (rare: a changed SubnetLen) are checked by range. Ints, because building an ipaddress
    object per taken lease and per draw was most of an allocation's time at 1,000 nodes."""

    def __init__(self, taken: list, length: int, bits: int) -> None:
        candidate_mask = ((1 << bits) - 1) ^ ((1 << (bits - length)) - 1)
        self.covering = {int(net.network_address) & candidate_mask for net in taken if net.prefixlen >= length}
        self.wider = [(int(net.network_address), int(net.broadcast_address)) for net in taken if net.prefixlen < length]

    def __contains__(self, start: int) -> bool:
        return start in self.covering or any(first <= start <= last for first, last in self.wider)


Net = TypeVar("Net", ipaddress.IPv4Network, ipaddress.IPv6Network)


def _pick_free(
    taken: list, first: int, last: int, length: int, network_type: type[Net], home: int, rng: random.Random
) -> Net:
    """A free subnet of `length` in [first, last]: the one at ordinal `home` modulo their number if it is free, else
    uniformly at random: random draws first (the range may be far too large to list, e.g. IPv6), then, if they keep
    hitting taken ones, a pick among the first free candidates."""
    bits = network_type(0).max_prefixlen
    occupied = _Taken(taken, length, bits)
    size = 1 << (bits - length)
    count = (last - first) // size + 1 if last >= first else 0
    if count > 0 and (start := first + home % count * size) not in occupied:
        return network_type((start, length))
    for _ in range(RANDOM_DRAWS if count > 0 else 0):
        start = first + rng.randrange(count) * size
        if start not in occupied:
            return network_type((start, length))
    return network_type((rng.choice(_free_candidates(occupied, first, last, size)), length))


def _free_candidates(occupied: _Taken, first: int, last: int, size: int) -> list[int]:
    """The first addresses of the first MAX_CANDIDATES subnets in [first, last] that overlap no taken subnet."""
    free = []
    for start in range(first, last + 1, size):
        if start in occupied:
            continue
        free.append(start)
        if len(free) == MAX_CANDIDATES:
            break
    if not free:
        raise OutOfSubnets()
    return free
