"""cni0 repair: when the pods' bridge disappears (`ip link del cni0`), loses its gateway address or its MTU, or a pod's
veth is cut from it, the node agent puts it back as the CNI plugin built it, at once and without a command by hand.

Driven by netlink notifications (net/bridge.LinkEvents), never by polling: an event that concerns a watched bridge or a
recorded veth wakes one check, which reads the CNI plugin's port records (cni_ports) and runs the idempotent repair
(net/bridge.repair_bridge) for each bridge they name. A repair is one log line saying what was done.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from . import cni_ports
from .net import netlink
from .net.bridge import BridgeError, BridgePort, BridgeSpec, LinkEvent, LinkEvents, link_indexes, repair_bridge
from .subnet import subnetenv
from .subnet.lease import Lease

log = logging.getLogger(__name__)

DEFAULT_BRIDGE = "cni0"


def gateway_addresses(lease: Lease) -> tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]:
    """The bridge's addresses as subnet.env gives them (FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET): each subnet's first
    address with the subnet's prefix length, which is what the bridge plugin sets with isGateway."""
    return tuple(subnetenv.gateway(subnet) for subnet in (lease.subnet, lease.ipv6_subnet) if subnet is not None)


class BridgeGuard:
    def __init__(self, nl: netlink.Netlink, cni_data_dir: str, lease: Lease, mtu: int) -> None:
        self.netlink = nl
        self.data_dir = cni_data_dir
        self.addresses = gateway_addresses(lease)
        self.mtu = mtu
        self._wake = asyncio.Event()
        # What the last check saw, to tell the events that matter from the rest of the node's link traffic.
        self._bridges: set[str] = {DEFAULT_BRIDGE}
        self._bridge_indexes: set[int] = set()
        self._veths: set[str] = set()
        self._failing: dict[str, str] = {}  # bridge -> last error logged (said once, not on every event)

    async def run(self) -> None:
        events = LinkEvents(self._on_event)
        events.open()
        log.info("Watching the pods' bridge for repair (records in %s)", cni_ports.ports_dir(self.data_dir))
        self._wake.set()  # one check at start: the bridge may have been deleted while the agent was down
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                await self.check()
        finally:
            events.close()

    def _on_event(self, event: LinkEvent) -> None:
        if self._concerns(event):
            self._wake.set()

    def _concerns(self, event: LinkEvent) -> bool:
        if event.kind == "overflow":
            return True
        if event.kind == "address_gone":
            return event.index in self._bridge_indexes
        if event.name in self._bridges:
            if event.kind == "link":
                self._bridge_indexes.add(event.index)  # a bridge the CNI plugin built since the last check
            return True
        return event.kind == "link" and event.name in self._veths and event.master not in self._bridge_indexes

    async def check(self) -> None:
        records = await asyncio.to_thread(cni_ports.read_all, self.data_dir)
        by_bridge: dict[str, list[cni_ports.PortRecord]] = {}
        for record in records:
            by_bridge.setdefault(record.bridge, []).append(record)
        self._bridges = {DEFAULT_BRIDGE, *by_bridge}
        self._veths = {record.veth for record in records}
        for name, ports in by_bridge.items():
            # The newest record has the bridge's current MAC (the CNI plugin may have rebuilt it since older ones).
            mac = max(ports, key=lambda p: p.written).bridge_mac
            spec = BridgeSpec(name, mac, self.mtu, self.addresses)
            try:
                attached = [BridgePort(p.veth, p.veth_index, p.hairpin) for p in ports]
                result = await self.netlink.call(repair_bridge, spec, attached)
            except (BridgeError, netlink.NetlinkError, OSError) as e:
                if self._failing.get(name) != str(e):
                    log.error("Cannot repair %s: %s", name, e)
                    self._failing[name] = str(e)
                continue
            self._failing.pop(name, None)
            if result.actions:
                log.warning("Repaired %s: %s", name, ", ".join(result.actions))
        # Every watched bridge that exists, with or without recorded pods yet: its address events must be seen.
        self._bridge_indexes = await self.netlink.call(link_indexes, self._bridges)
