"""The udp backend: TUN flannel0 plus the _fastpath pump, wire-compatible with upstream (IP packet as UDP payload).

Beyond upstream (whose udp is IPv4 only): with EnableIPv6 the lease gets an IPv6 subnet too and flannel0 carries both
families. IPv6 pod packets go to a peer's PublicIPv6 over an IPv6 underlay socket when both nodes have one, else over
the IPv4 underlay; either way the UDP payload stays the raw inner packet, so IPv4 traffic with an upstream peer is
unchanged. In an IPv6-only network (EnableIPv4 false) there is no IPv4 anywhere: no IPv4 socket, address or route,
flannel0 carries IPv6 alone, over the IPv6 underlay."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import threading
from typing import TYPE_CHECKING, Any

from _fastpath.pump import Pump
from _fastpath.routes import RouteTable

from ..defaults import UDP_PORT
from ..net import netlink
from ..net.iface import ExternalInterface
from ..net.tun import open_tun_queues
from ..net.udp_socket import accept_local_icmp, enable_gro
from ..subnet.config import NetworkConfig
from ..subnet.lease import NO_PUBLIC_IP, Lease, LeaseAdded, LeaseAttrs, LeaseEvent
from ..subnet.manager import SubnetManager
from . import Backend, BackendError, Network, UdpFlags, check_families, room_after, udp_lanes, udp_metrics
from .options import int_option

if TYPE_CHECKING:
    from pyroute2 import IPRoute

log = logging.getLogger(__name__)

ENCAP_OVERHEAD = 28  # outer IPv4 (20) + UDP (8)
ENCAP_OVERHEAD_V6 = 48  # outer IPv6 (40) + UDP (8)
# The TUN's queue towards us (default 500) overflows in bursts while the pump is busy with the other direction; each
# overflow is a TCP loss inside the tunnel. A deeper queue absorbs the bursts.
TUN_TXQUEUELEN = 5000


def parse_options(backend: dict[str, Any]) -> int:
    return int_option(backend, "UDP", "Port", UDP_PORT, 1, 65535)


class UdpBackend(Backend):
    dual_stack = True
    # IPv6 pod traffic may cross the IPv4 underlay: an interface without an IPv6 address is no error here.
    ipv6_underlay_optional = True

    def __init__(self, nl: netlink.Netlink, ext: ExternalInterface, config: NetworkConfig, flags: UdpFlags) -> None:
        if not config.enable_ipv4:
            check_families(config, ext)  # IPv6 alone needs the IPv6 underlay; beside IPv4 it is optional
        if config.ipv6_network is not None and not config.enable_ipv6:
            raise BackendError(
                "IPv6Network is set but EnableIPv6 is not: the udp backend would give pods no IPv6 "
                "subnet (set EnableIPv6, or remove IPv6Network)"
            )
        if config.enable_ipv6 and ext.ext_addr6 is not None and ext.ext_addr6 != ext.iface_addr6:
            raise BackendError(
                f"-public-ipv6 {ext.ext_addr6} is not an address of {ext.name} ({ext.iface_addr6}): the "
                "udp backend receives IPv6 underlay traffic on the interface's own address"
            )
        self.netlink = nl
        self.ext = ext
        self.config = config
        self.port = parse_options(config.backend)
        self.flags = flags

    def tun_mtu(self) -> int:
        """The interface's MTU less the encapsulation of the larger outer header in use."""
        overhead = ENCAP_OVERHEAD_V6 if self.ipv6_underlay else ENCAP_OVERHEAD
        mtu_text = f"the MTU of {self.ext.name} ({self.ext.mtu})"
        family = 6 if self.config.enable_ipv6 else 4
        return room_after(mtu_text, self.ext.mtu, overhead, "UDP encapsulation", family, "flannel0")

    @property
    def ipv6_underlay(self) -> bool:
        return self.config.enable_ipv6 and self.ext.iface_addr6 is not None

    def lease_attrs(self) -> LeaseAttrs:
        """Upstream's udp lease ({"PublicIP": ...}, no BackendType) for IPv4; in dual stack and IPv6-only, beyond
        upstream, the schema of the other dual-stack backends: BackendType "udp" and PublicIPv6 (null without an IPv6
        underlay; with IPv6 alone, PublicIP is upstream's zero 0.0.0.0)."""
        if not self.config.enable_ipv6:
            return LeaseAttrs(self.ext.ext_addr or NO_PUBLIC_IP)
        return LeaseAttrs(self.ext.ext_addr or NO_PUBLIC_IP, self.ext.ext_addr6, backend_type="udp")

    async def register_network(self, manager: SubnetManager) -> UdpNetwork:
        mtu = self.tun_mtu()
        addresses: list[udp_lanes.Address] = []
        addresses += [self.ext.iface_addr] if self.config.enable_ipv4 and self.ext.iface_addr else []
        addresses += [self.ext.iface_addr6] if self.ipv6_underlay and self.ext.iface_addr6 else []
        workers = self.flags.worker_count()
        # The sockets first: a busy port must fail before anything is allocated or configured.
        lanes = udp_lanes.open_sockets(addresses, self.port, workers)
        try:
            lease = await manager.acquire_lease(self.lease_attrs())
            tun_fds, tun_name, tun_offloads = open_tun_queues(workers, offloads=self.flags.offload)
            udp_lanes.attach_tun_queues(lanes, tun_fds)
            network4 = str(self.config.network) if lease.subnet is not None else None
            network6 = str(self.config.ipv6_network) if lease.ipv6_subnet is not None else None
            await self.netlink.call(configure_tun, tun_name, lease, mtu, network4, network6)
            accept_local_icmp(tun_name)
            own = [(lease.subnet, 32, network4), (lease.ipv6_subnet, 128, network6)]
            log.info(
                "%s is up: address %s, MTU %d, route %s; UDP on %s; %d packet thread%s",
                tun_name,
                " and ".join(f"{subnet.network_address}/{bits}" for subnet, bits, _ in own if subnet is not None),
                mtu,
                " and ".join(network for _, _, network in own if network is not None),
                " and ".join(f"[{a}]:{self.port}" if a.version == 6 else f"{a}:{self.port}" for a in addresses),
                workers,
                "s" if workers > 1 else "",
            )
            return UdpNetwork(lease, mtu, lanes, tun_name, self.port, self.flags, tun_offloads)
        except BaseException:
            udp_lanes.close_all(lanes)  # closing the TUN removes the device, its address and its route
            raise


def ipv6_next_hop(peer: Lease, own_ipv6_underlay: bool) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Where a peer's IPv6 pod traffic goes: its PublicIPv6 when both nodes have an IPv6 underlay, else its PublicIP.
    Both ends decide alike, so the sender of a datagram is always the peer its inner source routes to. (The capture
    mode asks it too, to judge datagrams as the receiving node would.)"""
    if own_ipv6_underlay and peer.attrs.public_ipv6 is not None:
        return peer.attrs.public_ipv6
    return peer.attrs.public_ip


def configure_tun(
    ipr: IPRoute, name: str, lease: Lease, mtu: int, network: str | None, network6: str | None = None
) -> None:
    """Upstream's configureIface: <subnet IP>/32, MTU = ext - 28, up, a route for the whole Network; in dual stack
    also <IPv6 subnet address>/128 and a route for the IPv6Network; in an IPv6-only network only those."""
    link = netlink.link_by_name(ipr, name)
    if link is None:
        raise BackendError(f"{name} vanished while it was being configured")
    if network is not None and lease.subnet is not None:
        netlink.replace_address(ipr, link.index, str(lease.subnet.network_address), 32)
    if network6 is not None and lease.ipv6_subnet is not None:
        netlink.replace_address(ipr, link.index, str(lease.ipv6_subnet.network_address), 128)
    netlink.set_link(ipr, link.index, mtu=mtu, up=True, txqlen=TUN_TXQUEUELEN)
    for route in (network, network6):
        if route is not None:
            netlink.replace_route(ipr, route, oif=link.index)


class UdpNetwork(Network):
    """flannel0 and the packet threads: one pump per lane, each in a thread of its own, sharing the route table."""

    def __init__(
        self,
        lease: Lease,
        mtu: int,
        lanes: list[udp_lanes.Lane],
        tun_name: str,
        port: int,
        flags: UdpFlags,
        tun_offloads: int = 0,
    ) -> None:
        self.lease = lease
        self.mtu = mtu
        self.lanes = lanes
        self.tun_name = tun_name
        self.port = port
        self.flags = flags
        self.sockets = [sock for lane in lanes for sock in lane.sockets()]
        self.ipv6_underlay = lanes[0].sock6 is not None
        self.routes = RouteTable()  # one table for every pump: a lease event changes it once for all
        self._ipv6_subnets: dict = {}  # a peer's primary subnet -> its IPv6 subnet, to remove both routes together
        self._gso_reported = False
        receiving = [s for lane in lanes for s in (lane.sock, lane.sock6) if s is not None]
        gro = flags.offload and all(enable_gro(s) for s in receiving)
        # The pump threads tell the event loop through this eventfd when one had to turn GSO off: logged at once.
        self._notice_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        loop = asyncio.get_running_loop()
        loop.add_reader(self._notice_fd, self._on_pump_notice)
        try:
            self.pumps = [self._make_pump(lane, gro, tun_offloads) for lane in lanes]
        except BaseException:  # nothing half-built: the caller closes the lanes it handed over
            loop.remove_reader(self._notice_fd)
            os.close(self._notice_fd)
            raise
        log.info(
            "Offloads: UDP GSO %s, UDP GRO %s, TUN %s",
            "on" if flags.offload else "off",
            "on" if gro else "off",
            f"{tun_offloads:#x} (TSO split, TCP coalescing)" if tun_offloads else "off",
        )
        # Each pump's own thread: its loop never takes the GIL, so nothing the control plane does in this interpreter
        # (watches, netlink, SQLite, metrics, garbage collection) delays a packet. One eventfd stops them all.
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._threads = [
            threading.Thread(
                target=self._run_pump,
                args=(pump, self._cpu_of(index)),
                name=f"udp-pump-{index}",
                daemon=True,
            )
            for index, pump in enumerate(self.pumps)
        ]
        for thread in self._threads:
            thread.start()

    def _cpu_of(self, index: int) -> int | None:
        """With one pump per CPU the process may run on, pump `index` is pinned to one of them. The pairing is rotated
        by the node's address: nodes that share a machine (VMs, test clusters) would otherwise put a flow's two ends,
        which have the same pump index on both nodes, on one CPU."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(self.pumps) < 2 or len(self.pumps) != len(cpus):
            return None
        attrs = self.lease.attrs
        rotation = int(attrs.public_ipv6 if self.lease.subnet is None and attrs.public_ipv6 else attrs.public_ip)
        return cpus[(index + rotation) % len(cpus)]

    def _make_pump(self, lane: udp_lanes.Lane, gro: bool, tun_offloads: int) -> Pump:
        def fd(sock: socket.socket | None) -> int:
            return sock.fileno() if sock is not None else -1

        return Pump(
            lane.tun_fd,
            fd(lane.sock),
            self.routes,
            str(self.lease.subnet) if self.lease.subnet is not None else None,
            self.flags.source_check,
            gso=self.flags.offload,
            gro=gro,
            vnet_hdr=bool(tun_offloads),
            sock6_fd=fd(lane.sock6),
            own_subnet6=str(self.lease.ipv6_subnet) if self.lease.ipv6_subnet is not None else None,
            notify_fd=self._notice_fd,
            send_fd=fd(lane.source),
            send6_fd=fd(lane.source6),
        )

    def _run_pump(self, pump: Pump, cpu: int | None = None) -> None:
        if cpu is not None:
            # One pump per CPU: each stays where its queues' data is warm instead of following the scheduler.
            os.sched_setaffinity(0, {cpu})
        priority = self.flags.priority
        if priority:
            # Why: under load the pump competes for the CPU with the pods it serves; at ordinary priority it waits
            # its turn behind them, and so does every packet in the tunnel. The kernel's own tunnels run in softirq,
            # ahead of every thread; a real-time packet thread is the userspace equivalent. It sleeps in poll() when
            # idle, and the kernel's RT throttling keeps a share of each CPU for ordinary tasks even under a flood.
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
                log.info("Packet thread runs at real-time priority %d (SCHED_FIFO)", priority)
            except OSError as e:
                log.warning(
                    "Cannot give the packet thread real-time priority %d (%s); it runs at ordinary priority",
                    priority,
                    e.strerror,
                )
        if self.flags.busy_poll_us:
            log.info("Packet thread keeps polling %d µs after each burst before it sleeps", self.flags.busy_poll_us)
        pump.run(self._stop_fd, self.flags.busy_poll_us)

    def _on_pump_notice(self) -> None:
        try:
            os.eventfd_read(self._notice_fd)
        except BlockingIOError:
            return
        for pump in self.pumps:
            # One line per node: the refusal is the kernel's or the device's, so every pump meets it; each pump's
            # own state stays on /metrics.
            if not pump.gso and pump.gso_error and not self._gso_reported:
                self._gso_reported = True
                log.warning(
                    "UDP GSO refused by the kernel (%s); sending one datagram per packet from now on",
                    os.strerror(pump.gso_error),
                )

    async def apply(self, events: list[LeaseEvent]) -> None:
        for event in events:
            if isinstance(event, LeaseAdded):
                self._add_peer(event.lease)
                continue
            if event.subnet is not None and self.routes.delete_route(event.subnet):
                log.info("Route %s removed", event.subnet)
            subnet6 = self._ipv6_subnets.pop(event.primary, None) or event.ipv6_subnet
            if subnet6 is not None and self.routes.delete_route(subnet6):
                log.info("Route %s removed", subnet6)

    def _add_peer(self, lease: Lease) -> None:
        """A route for each family both nodes carry. Every lease gets one whatever its BackendType, as upstream."""
        if self.lease.subnet is not None and lease.subnet is not None:
            self.routes.set_route(lease.subnet, lease.attrs.public_ip, self.port)
            log.info("Route %s via %s:%d", lease.subnet, lease.attrs.public_ip, self.port)
        old6 = self._ipv6_subnets.pop(lease.primary, None)
        if old6 is not None and old6 != lease.ipv6_subnet:
            self.routes.delete_route(old6)
        if self.lease.ipv6_subnet is not None and lease.ipv6_subnet is not None:
            hop = ipv6_next_hop(lease, self.ipv6_underlay)
            self.routes.set_route(lease.ipv6_subnet, hop, self.port)
            self._ipv6_subnets[lease.primary] = lease.ipv6_subnet
            log.info(
                "Route %s via %s",
                lease.ipv6_subnet,
                f"[{hop}]:{self.port}" if hop.version == 6 else f"{hop}:{self.port}",
            )

    def collect_metrics(self):
        return udp_metrics.collect(self)

    async def close(self) -> None:
        os.eventfd_write(self._stop_fd, 1)
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        os.close(self._stop_fd)
        asyncio.get_running_loop().remove_reader(self._notice_fd)
        os.close(self._notice_fd)
        udp_lanes.close_all(self.lanes)
