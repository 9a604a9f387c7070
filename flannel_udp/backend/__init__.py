"""Backends by name (upstream's registry): each turns lease events into kernel or fast-path state."""

from __future__ import annotations

import asyncio
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from ..net import netlink
from ..net.iface import ExternalInterface
from ..subnet.config import NetworkConfig
from ..subnet.lease import Lease, LeaseEvent, LeaseRemoved
from ..subnet.manager import SubnetManager

log = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 16  # past this, one node's overlay traffic rarely has the flows to keep more threads busy
IPV4_MIN_MTU = 68  # RFC 791: every IPv4 link carries 68 bytes unfragmented
IPV6_MIN_MTU = 1280  # RFC 8200


class BackendError(RuntimeError):
    """A backend that cannot start: bad options, a busy port, a missing device."""


def room_after(mtu_text: str, mtu: int, overhead: int, encapsulation: str, family: int, target: str) -> int:
    """The MTU left for `target` after an encapsulation; BackendError when that is below the family's minimum."""
    left, minimum = mtu - overhead, (IPV6_MIN_MTU if family == 6 else IPV4_MIN_MTU)
    if left < minimum:
        raise BackendError(
            f"{mtu_text} leaves {left} bytes for {target} after the {overhead}-byte {encapsulation}, below "
            f"IPv{family}'s minimum of {minimum}"
        )
    return left


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

    async def supervise(self) -> None:
        """The backend's own background work (vxlan's device watchdog, host-gw's route check), run by the daemon in
        its task group for as long as the node serves; by default none."""
        await asyncio.Event().wait()

    @abstractmethod
    async def close(self) -> None: ...

    async def undo(self) -> None:
        """After a failed start with a new lease: remove what this start configured (by default what close() removes;
        a backend that leaves state in place on a clean exit removes it here)."""
        await self.close()


@dataclass(frozen=True)
class UdpFlags:
    """The node flags of the udp backend (-udp-source-check, -udp-offload, -udp-priority, -udp-busy-poll,
    -udp-workers)."""

    source_check: bool = True
    offload: bool = True
    priority: int = 0
    busy_poll_us: int = 0
    workers: int = 0  # 0: one per CPU the process may run on, up to MAX_AUTO_WORKERS

    def worker_count(self) -> int:
        if self.workers > 0:
            return self.workers
        return max(1, min(len(os.sched_getaffinity(0)), MAX_AUTO_WORKERS))


class Backend(ABC):
    """A backend by name (upstream's backend.Backend): made from the network config, the external interface and the
    node's data-plane flags, it acquires the lease and sets up its devices (register_network). Its class attributes
    say what interface it needs before it is made."""

    backend_type: ClassVar[str] = ""  # the lease's BackendType ("" for udp, as upstream writes it)
    dual_stack: ClassVar[bool] = False  # carries IPv6 pods beside IPv4 ones
    ipv6_underlay_optional: ClassVar[bool] = False  # its IPv6 pods may cross an IPv4 underlay

    @abstractmethod
    def __init__(self, nl: netlink.Netlink, ext: ExternalInterface, config: NetworkConfig, flags: UdpFlags) -> None:
        """Checks the backend's options; raises BackendError for any it cannot use."""

    @abstractmethod
    async def register_network(self, manager: SubnetManager) -> Network:
        """Acquire the lease through the manager and set up the devices; the Network then follows lease events."""


class BackendTypeFilter:
    """Upstream's rule in the kernel backends: a lease of another backend type is ignored (said once per type).
    Removals always pass: they name only subnets, and a backend removes only what it set up."""

    def __init__(self, backend_type: str) -> None:
        self.backend_type = backend_type
        self._ignored: set[str] = set()

    def accepts(self, event: LeaseEvent) -> bool:
        if isinstance(event, LeaseRemoved) or event.lease.attrs.backend_type == self.backend_type:
            return True
        kind = event.lease.attrs.backend_type
        if kind not in self._ignored:
            self._ignored.add(kind)
            log.warning(
                "Ignoring leases of backend type %r (this node runs %s), e.g. %s",
                kind or "udp",
                self.backend_type,
                event.primary,
            )
        return False


def check_families(config: NetworkConfig, ext: ExternalInterface) -> None:
    """IPv4, dual stack or IPv6-only; an IPv6 side needs an IPv6 address on the external interface."""
    if config.enable_ipv6 and ext.ext_addr6 is None:
        raise BackendError(f"EnableIPv6 is set but no IPv6 address was chosen on {ext.name}")


def make_backend(config: NetworkConfig, nl: netlink.Netlink, ext: ExternalInterface, flags: UdpFlags) -> Backend:
    """The backend the config names."""
    return backend_class(config.backend_name)(nl, ext, config, flags)


def backend_class(name: str) -> type[Backend]:
    """Upstream looks the type up lower-cased; `hostgw` without the dash is unknown there too. Only the named backend
    is imported (the wireguard one loads libcrypto and the handshake's libraries)."""
    name = name.lower()
    if name == "udp":
        from .udp import UdpBackend

        return UdpBackend
    if name == "vxlan":
        from .vxlan import VxlanBackend

        return VxlanBackend
    if name == "host-gw":
        from .hostgw import HostGwBackend

        return HostGwBackend
    if name == "wireguard":
        from .wireguard import WireguardBackend

        return WireguardBackend
    raise BackendError(f"unknown backend type: {name}")
