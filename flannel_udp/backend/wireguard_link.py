"""One WireGuard device of the wireguard backend: a TUN (flannel-wg or flannel-wg-v6), its UDP socket per underlay
family, its pump thread (_fastpath/wg.pyx) and the control plane of its handshakes (flannel_udp/wireguard/device.py).

A device carries pod traffic of one family (upstream's "separate" mode: flannel-wg for IPv4, flannel-wg-v6 for IPv6)
or of both (modes "auto", "ipv4" and "ipv6": flannel-wg alone). Each peer is one lease: its subnets of the families
the device carries are its allowed IPs, and its messages go to one of its public addresses, the one the mode picks."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

from _fastpath.routes import RouteTable
from _fastpath.wg import WgPump, WgState
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..net.udp_socket import enable_gro
from ..subnet.config import lookup_key
from ..subnet.lease import NO_PUBLIC_IP, Lease, LeaseAttrs
from ..wireguard import keys, noise
from ..wireguard.device import WireguardDevice, where
from .udp_metrics import CALLS, summed

log = logging.getLogger(__name__)

Subnet = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# Go's IP.IsPrivate, which upstream's "auto" mode asks of a peer's addresses (Python's is_private is broader).
GO_PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")]


@dataclass(frozen=True)
class LinkPlan:
    """What one device is: its name, the pod families it carries and how it picks a peer's address ("ipv4", "ipv6"
    or "auto")."""

    name: str
    carries: tuple[int, ...]
    endpoints: str


def go_private(address: Address) -> bool:
    return any(address in network for network in GO_PRIVATE if network.version == address.version)


def endpoint_family(how: str, attrs: LeaseAttrs, ours: dict[int, Address]) -> int | None:
    """The underlay family to reach a peer on (ours: this device's public address per family it has a socket for):
    the mode's, or in "auto" upstream's choice (IPv4, unless the peer's IPv4 address is private and both sides have
    a public IPv6 one, or IPv4 is missing on one side); None when either side lacks an address of that family."""
    theirs: dict[int, Address] = {4: attrs.public_ip} if attrs.public_ip != NO_PUBLIC_IP else {}
    if attrs.public_ipv6 is not None:
        theirs[6] = attrs.public_ipv6
    if how == "auto":
        v6_public = 6 in theirs and 6 in ours and not go_private(theirs[6]) and not go_private(ours[6])
        v4 = 4 in theirs and 4 in ours
        how = "ipv4" if v4 and (not go_private(theirs[4]) or not v6_public) else "ipv6"
    family = 4 if how == "ipv4" else 6
    return family if family in theirs and family in ours else None


@dataclass
class Lane:
    """One packet thread's TUN queue and sockets (one per underlay family, each of a SO_REUSEPORT group on the port:
    every thread sends from the listening port, and the kernel gives each peer's datagrams to one of them)."""

    tun_fd: int
    sockets: dict[int, socket.socket]

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        if self.tun_fd >= 0:
            os.close(self.tun_fd)
            self.tun_fd = -1


class WgLink:
    """One device: its TUN, sockets, route table (also its allowed-IPs table), sessions, pumps and handshakes."""

    def __init__(
        self,
        plan: LinkPlan,
        lease: Lease,
        identity: noise.Identity,
        options: dict[str, Any],
        lanes: list[Lane],
        public: dict[int, Address],
        mtu: int,
        offloads: int,
        offload: bool,
    ) -> None:
        self.plan = plan
        self.options = options
        self.lanes = lanes
        self.sockets = lanes[0].sockets  # handshakes and keepalives leave from the first (any would do)
        self.public = public  # this node's address per underlay family, as peers reach it
        self.routes = RouteTable()  # subnet -> peer: where a packet goes, and whose keys may send from it
        # A lease's primary subnet -> its key, routes and endpoint as the lease has it.
        self._peer_of: dict[Subnet, tuple[bytes, list[Subnet], tuple[str, int]]] = {}
        self._skipped: set[Subnet] = set()  # leases this device cannot reach, said once each
        self._notice_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.state = WgState(self.routes, self._notice_fd)
        self.state.mtu = mtu
        self.device = WireguardDevice(
            identity, options["psk"], self.state, self.sockets, float(options["keepalive"]), options.get("timers")
        )
        gro = offload and all(enable_gro(s) for lane in lanes for s in lane.sockets.values())
        own = str(lease.subnet) if 4 in plan.carries and lease.subnet is not None else None
        own6 = str(lease.ipv6_subnet) if 6 in plan.carries and lease.ipv6_subnet is not None else None
        self.pumps = [
            WgPump(
                lane.tun_fd,
                lane.sockets[4].fileno() if 4 in lane.sockets else -1,
                self.routes,
                self.state,
                own,
                gso=offload,
                gro=gro,
                vnet_hdr=bool(offloads),
                sock6_fd=lane.sockets[6].fileno() if 6 in lane.sockets else -1,
                own_subnet6=own6,
                notify_fd=self._notice_fd,
            )
            for lane in lanes
        ]
        asyncio.get_running_loop().add_reader(self._notice_fd, self._on_notice)
        self._threads = [
            threading.Thread(target=pump.run, args=(self._stop_fd,), name=f"{plan.name}-{i}", daemon=True)
            for i, pump in enumerate(self.pumps)
        ]
        for thread in self._threads:
            thread.start()

    def _on_notice(self) -> None:
        try:
            os.eventfd_read(self._notice_fd)
        except BlockingIOError:
            pass
        self.device.on_notice()

    def tick(self) -> None:
        self.device.tick()

    # -- peers, from lease events ------------------------------------------------------------------------------------
    def add_peer(self, lease: Lease) -> None:
        subnets: list[Subnet] = [
            s
            for family, s in ((4, lease.subnet), (6, lease.ipv6_subnet))
            if s is not None and family in self.plan.carries
        ]
        if not subnets:
            return
        family = endpoint_family(self.plan.endpoints, lease.attrs, self.public)
        if family is None:
            if lease.primary not in self._skipped:
                self._skipped.add(lease.primary)
                log.warning(
                    "%s: the lease of %s has no %s address to reach it on",
                    self.plan.name,
                    lease.primary,
                    "IPv6" if self.plan.endpoints == "ipv6" else "usable",
                )
            return
        attrs = lease.attrs
        data, other = (
            (attrs.backend_data, attrs.backend_v6_data) if family == 4 else (attrs.backend_v6_data, attrs.backend_data)
        )
        data = data if isinstance(data, dict) else other if isinstance(other, dict) else {}
        try:
            public = keys.parse_key(str(lookup_key(data, "PublicKey", "")), "PublicKey")
        except keys.WireguardKeyError as e:
            log.error("Ignoring the lease of %s: its BackendData %s", lease.primary, e)
            return
        port = lookup_key(data, "Port", 0)
        own_port = self.options["port"] if family == 4 else self.options["port6"]
        port = port if isinstance(port, int) and 0 < port < 65536 else own_port  # older upstream leases: ours
        address = attrs.public_ip if family == 4 else attrs.public_ipv6
        endpoint = (str(address), port)
        old = self._peer_of.get(lease.primary)
        if old == (public, subnets, endpoint):
            return  # the same lease again (renewed): a peer that roamed stays where it is
        if old is not None and old[0] != public:
            self.device.remove_peer(old[0])
        for stale in old[1] if old is not None else []:
            if stale not in subnets:
                self.routes.delete_route(stale)
        for subnet in subnets:
            self.routes.set_route(subnet, address, port)
        self._peer_of[lease.primary] = (public, subnets, endpoint)
        self._skipped.discard(lease.primary)
        self.device.set_peer(public, self.routes.peer_index(subnets[0]), endpoint)
        log.info("%s: subnet added: %s via %s", self.plan.name, ", ".join(map(str, subnets)), where(endpoint))

    def remove_peer(self, primary: Subnet) -> None:
        self._skipped.discard(primary)
        known = self._peer_of.pop(primary, None)
        if known is None:
            return
        public, subnets, _ = known
        self.device.remove_peer(public)
        for subnet in subnets:
            self.routes.delete_route(subnet)
        log.info("%s: subnet removed: %s", self.plan.name, ", ".join(map(str, subnets)))

    # -- metrics -----------------------------------------------------------------------------------------------------
    def add_metrics(
        self, packets: Any, drops: Any, handshakes: Any, peers: Any, pump_packets: Any, io_calls: Any
    ) -> None:
        name = self.plan.name
        for index, pump in enumerate(self.pumps):
            mine = pump.counters()
            for stage in ("tun_read_packets", "udp_sent_packets", "udp_received_packets", "tun_written_packets"):
                pump_packets.add_metric([name, str(index), stage], mine[stage])
        counters = self.counters()
        for stage in (
            "tun_read_packets",
            "udp_sent_packets",
            "udp_received_packets",
            "tun_written_packets",
            "keepalives_received",
            "handshake_messages",
        ):
            packets.add_metric([name, stage], counters[stage])
        for kind in CALLS:
            if kind in counters:  # the udp pump's batched calls that a WireGuard pump makes too
                io_calls.add_metric([name, kind], counters[kind])
        for direction, key in (("tun_to_udp", "drops_tun_to_udp"), ("udp_to_tun", "drops_udp_to_tun")):
            for reason, value in sorted(counters[key].items()):
                drops.add_metric([name, direction, reason], value)
        for event, value in sorted(self.device.stats.items()):
            if event.startswith("drop_"):
                drops.add_metric([name, "handshake", event[5:]], value)
            else:
                handshakes.add_metric([name, event], value)
        peers.add_metric([name], len(self.device.peers))

    def counters(self) -> dict[str, Any]:
        """The pumps' counters added up (drops by reason too)."""
        return summed([pump.counters() for pump in self.pumps])

    async def close(self) -> None:
        os.eventfd_write(self._stop_fd, 1)
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        asyncio.get_running_loop().remove_reader(self._notice_fd)
        os.close(self._notice_fd)
        os.close(self._stop_fd)
        for lane in self.lanes:
            lane.close()  # the TUN goes with its last fd: its addresses and routes with it


def metric_families():
    """The wireguard backend's metric families, each labelled by device."""
    return (
        CounterMetricFamily(
            "flannel_udp_wireguard_packets", "Packets through a WireGuard device, by stage", labels=["device", "stage"]
        ),
        CounterMetricFamily(
            "flannel_udp_wireguard_drops",
            "Packets and datagrams dropped, by reason",
            labels=["device", "direction", "reason"],
        ),
        CounterMetricFamily(
            "flannel_udp_wireguard_handshake_events",
            "Handshake messages sent and handshakes completed",
            labels=["device", "event"],
        ),
        GaugeMetricFamily("flannel_udp_wireguard_peers", "WireGuard peers (one per lease)", labels=["device"]),
        CounterMetricFamily(
            "flannel_udp_wireguard_pump_packets",
            "Packets through each packet thread of a WireGuard device, by stage",
            labels=["device", "pump", "stage"],
        ),
        CounterMetricFamily(
            "flannel_udp_wireguard_io_calls",
            "Batched syscalls of a WireGuard device (packets per call shows how well batching works)",
            labels=["device", "kind"],
        ),
    )
