"""Backends by name (upstream's registry): each turns lease events into kernel or fast-path state."""
from __future__ import annotations

from abc import ABC, abstractmethod

from ..subnet.lease import Lease, LeaseEvent


IPV4_MIN_MTU = 68  # RFC 791: every IPv4 link carries 68 bytes unfragmented
IPV6_MIN_MTU = 1280  # RFC 8200


class BackendError(RuntimeError):
    """A backend that cannot start: bad options, a busy port, a missing device."""


class Network(ABC):
    """What a backend hands back after acquiring the lease and setting up its devices."""
    lease: Lease
    mtu: int

    @abstractmethod
    async def apply(self, events: list[LeaseEvent]) -> None:
        """Bring the data plane in line with a batch of added/removed peer leases."""

    def collect_metrics(self):
        """Prometheus metric families of the data plane (none by default)."""
        return []

    @abstractmethod
    async def close(self) -> None: ...

    async def undo(self) -> None:
        """After a failed start with a new lease: remove what this start configured (by default what close() removes;
        a backend that leaves state in place on a clean exit removes it here)."""
        await self.close()


def check_families(config, ext) -> None:
    """The kernel backends run IPv4 or dual stack; an IPv6 side needs an IPv6 address on the external interface."""
    if not config.enable_ipv4:
        raise BackendError("IPv6-only networks are not supported with a lease store (its keys always carry an IPv4 "
                           "subnet): set EnableIPv4 too (dual stack)")
    if config.enable_ipv6 and ext.ext_addr6 is None:
        raise BackendError(f"EnableIPv6 is set but no IPv6 address was chosen on {ext.name}")


def backend_class(name: str):
    """Upstream looks the type up lower-cased; `hostgw` without the dash is unknown there too."""
    from .hostgw import HostGwBackend
    from .udp import UdpBackend
    from .vxlan import VxlanBackend
    registry = {"udp": UdpBackend, "vxlan": VxlanBackend, "host-gw": HostGwBackend}
    name = name.lower()
    try:
        return registry[name]
    except KeyError:
        raise BackendError(f"unknown backend type: {name}") from None
