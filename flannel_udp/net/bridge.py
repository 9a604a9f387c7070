"""The pods' bridge (cni0) as the node agent repairs it: netlink notifications of link and address changes, and the
idempotent repair itself (run on the netlink thread through Netlink.call).

Notifications come from a NETLINK_ROUTE socket subscribed to the link and address groups, read on the event loop
(add_reader: no thread, no polling) and decoded by pyroute2's rtnetlink parser.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

log = logging.getLogger(__name__)

RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
RTM_NEWLINK, RTM_DELLINK, RTM_DELADDR = 16, 17, 21
IFF_UP = 0x1
IFA_F_NODAD = 0x02
EVENT_BUFFER = 1 << 20


@dataclass(frozen=True)
class LinkEvent:
    kind: str  # "link" (new or changed), "link_gone", "address_gone"; "overflow": events were lost, check everything
    name: str | None = None
    index: int = 0
    master: int | None = None


class LinkEvents:
    """Link and address notifications of this network namespace, passed to `deliver` on the event loop."""

    def __init__(self, deliver: Callable[[LinkEvent], None]) -> None:
        self._deliver = deliver
        self._sock: socket.socket | None = None
        self._parser = MarshalRtnl()

    def open(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, EVENT_BUFFER)
            sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            sock.setblocking(False)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._read)
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _read(self) -> None:
        while self._sock is not None:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # the kernel dropped notifications: whatever they said is unknown
                    self._deliver(LinkEvent("overflow"))
                    continue
                raise
            for msg in self._parser.parse(data):
                event = self._event(msg)
                if event is not None:
                    self._deliver(event)

    @staticmethod
    def _event(msg) -> LinkEvent | None:
        kind = msg["header"]["type"]
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            return LinkEvent(
                "link" if kind == RTM_NEWLINK else "link_gone",
                msg.get_attr("IFLA_IFNAME"),
                msg["index"],
                msg.get_attr("IFLA_MASTER"),
            )
        if kind == RTM_DELADDR:
            return LinkEvent("address_gone", None, msg["index"])
        return None


@dataclass(frozen=True)
class BridgePort:
    """A pod's host-side veth as the CNI plugin attached it."""

    veth: str
    veth_index: int  # with the name: a later link that reuses the name is never enslaved by mistake
    hairpin: bool


@dataclass(frozen=True)
class BridgeSpec:
    """What the bridge must look like, from subnet.env: the gateway address of each family's subnet, FLANNEL_MTU."""

    name: str
    mac: str
    mtu: int
    addresses: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]


@dataclass
class RepairResult:
    actions: list[str] = field(default_factory=list)  # what was wrong and is now put right; empty if nothing was


class BridgeError(RuntimeError):
    pass


def _live_ports(ipr: IPRoute, ports: list[BridgePort]) -> list[tuple[BridgePort, Any]]:
    """The recorded ports whose veth still exists as the same link (same name and ifindex)."""
    live = []
    for port in ports:
        link = _link(ipr, port.veth_index)
        if link is not None and link.get_attr("IFLA_IFNAME") == port.veth:
            live.append((port, link))
    return live


def _link(ipr: IPRoute, index: int):
    try:
        return ipr.get_links(index)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def link_indexes(ipr: IPRoute, names: set[str]) -> set[int]:
    """The ifindexes of the links with these names that exist."""
    return {index for name in names for index in ipr.link_lookup(ifname=name)}


def repair_bridge(ipr: IPRoute, spec: BridgeSpec, ports: list[BridgePort]) -> RepairResult:
    """Make the bridge match `spec` and enslave its recorded, still existing ports; nothing at all while no recorded
    port is alive (then no pod needs the bridge, and the CNI plugin builds it for the next one)."""
    live = _live_ports(ipr, ports)
    found = ipr.link_lookup(ifname=spec.name)
    if not live:
        return RepairResult()
    result = RepairResult()
    if not found:
        try:
            ipr.link("add", ifname=spec.name, kind="bridge", address=spec.mac, mtu=spec.mtu)
            result.actions.append(f"recreated it (MAC {spec.mac})")
        except NetlinkError as e:
            if e.code != errno.EEXIST:  # the CNI plugin may be building it for a new pod right now: then use it
                raise
        found = ipr.link_lookup(ifname=spec.name)
        if not found:
            raise BridgeError(f"{spec.name} vanished while it was being rebuilt")
    index = found[0]
    link = ipr.get_links(index)[0]
    kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    if kind != "bridge":
        raise BridgeError(f"{spec.name} exists but is a {kind or 'plain'} device, not a bridge; leaving it alone")
    if link.get_attr("IFLA_MTU") != spec.mtu:
        ipr.link("set", index=index, mtu=spec.mtu)
        result.actions.append(f"MTU {link.get_attr('IFLA_MTU')} -> {spec.mtu}")
    if not link["flags"] & IFF_UP:
        ipr.link("set", index=index, state="up")
        result.actions.append("set up")
    present = {(ipaddress.ip_address(a.get_attr("IFA_ADDRESS")), a["prefixlen"]) for a in ipr.get_addr(index=index)}
    for wanted in spec.addresses:
        if (wanted.ip, wanted.network.prefixlen) in present:
            continue
        # No duplicate address detection for the IPv6 gateway: it is ours, and pods need it at once.
        extra = {"flags": IFA_F_NODAD} if wanted.version == 6 else {}
        ipr.addr("replace", index=index, address=str(wanted.ip), prefixlen=wanted.network.prefixlen, **extra)
        result.actions.append(f"address {wanted}")
    attached = []
    for port, veth in live:
        if veth.get_attr("IFLA_MASTER") == index:
            continue
        ipr.link("set", index=port.veth_index, master=index)
        if port.hairpin:
            ipr.brport("set", index=port.veth_index, mode=1)  # IFLA_BRPORT_MODE: hairpin, as the bridge plugin set it
        attached.append(port.veth)
    if attached:
        result.actions.append(
            f"re-attached {len(attached)} pod veth{'s' if len(attached) > 1 else ''} ({', '.join(attached)})"
        )
    return result
