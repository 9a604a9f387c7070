"""Backends by name (upstream's registry): each turns lease events into kernel or fast-path state."""
from __future__ import annotations

from abc import ABC, abstractmethod

from ..subnet.lease import Lease, LeaseEvent


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
