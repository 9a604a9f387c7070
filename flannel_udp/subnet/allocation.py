"""Which subnet a node gets (upstream tryAcquireLease), as a pure decision over the current leases.

Order, as upstream: reuse the lease that carries our public IP if it still fits the config (else delete it); else the
previous subnet from subnet.env if it is still free and fits; else a random pick among the first 100 free candidates.
"""
from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

from .config import NetworkConfig
from .lease import IPv4Net, IPv6Net, Lease

MAX_CANDIDATES = 100


class OutOfSubnets(RuntimeError):
    def __init__(self) -> None:
        super().__init__("out of subnets")


@dataclass(frozen=True)
class Decision:
    subnet: IPv4Net
    ipv6_subnet: IPv6Net | None
    reuse: Lease | None  # the existing lease to refresh, or None to create a new key
    delete: tuple[Lease, ...] = ()  # incompatible leases of ours to remove first


def is_compatible(cfg: NetworkConfig, subnet: IPv4Net, ipv6_subnet: IPv6Net | None) -> bool:
    if not (cfg.subnet_min <= subnet.network_address <= cfg.subnet_max and subnet.prefixlen == cfg.subnet_len):
        return False
    if not cfg.enable_ipv6:
        return ipv6_subnet is None
    return (
        ipv6_subnet is not None
        and cfg.ipv6_subnet_min <= ipv6_subnet.network_address <= cfg.ipv6_subnet_max
        and ipv6_subnet.prefixlen == cfg.ipv6_subnet_len
    )


def decide(
    cfg: NetworkConfig,
    leases: list[Lease],
    public_ip: ipaddress.IPv4Address,
    previous: tuple[IPv4Net | None, IPv6Net | None] = (None, None),
    rng: random.Random | None = None,
) -> Decision:
    rng = rng or random.Random()
    delete: list[Lease] = []
    mine = next((lease for lease in leases if lease.attrs.public_ip == public_ip), None)
    if mine is not None:
        if is_compatible(cfg, mine.subnet, mine.ipv6_subnet):
            return Decision(mine.subnet, mine.ipv6_subnet, reuse=mine)
        delete.append(mine)
        leases = [lease for lease in leases if lease is not mine]

    prev4, prev6 = previous
    if prev4 is not None and all(lease.subnet != prev4 for lease in leases):
        prev6_ok = prev6 if cfg.enable_ipv6 else None
        if is_compatible(cfg, prev4, prev6_ok):
            return Decision(prev4, prev6_ok, reuse=None, delete=tuple(delete))

    subnet = rng.choice(_free_candidates(
        [lease.subnet for lease in leases], int(cfg.subnet_min), int(cfg.subnet_max), cfg.subnet_len, ipaddress.IPv4Network))
    ipv6_subnet = None
    if cfg.enable_ipv6:
        ipv6_subnet = rng.choice(_free_candidates(
            [lease.ipv6_subnet for lease in leases if lease.ipv6_subnet is not None],
            int(cfg.ipv6_subnet_min), int(cfg.ipv6_subnet_max), cfg.ipv6_subnet_len, ipaddress.IPv6Network))
    return Decision(subnet, ipv6_subnet, reuse=None, delete=tuple(delete))


def _free_candidates(taken: list, first: int, last: int, length: int, network_type) -> list:
    """The first MAX_CANDIDATES subnets of `length` in [first, last] that overlap no taken subnet."""
    # A candidate overlaps a taken net iff one contains the other: longer taken nets are folded to their enclosing
    # candidate, shorter ones (rare: a changed SubnetLen) are checked by containment.
    covering = {net.supernet(new_prefix=length) for net in taken if net.prefixlen >= length}
    wider = [net for net in taken if net.prefixlen < length]
    size = 1 << (network_type(0).max_prefixlen - length)
    free = []
    for start in range(first, last + 1, size):
        candidate = network_type((start, length))
        if candidate in covering or any(candidate.subnet_of(net) for net in wider):
            continue
        free.append(candidate)
        if len(free) == MAX_CANDIDATES:
            break
    if not free:
        raise OutOfSubnets()
    return free
