"""The udp backend: TUN flannel0 plus the _fastpath pump, wire-compatible with upstream (IPv4 packet as UDP payload)."""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import sys
import threading
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from _fastpath.pump import Pump
from _fastpath.routes import RouteTable

from ..net import netlink
from ..net.iface import ExternalInterface
from ..net.tun import open_tun
from ..subnet.config import NetworkConfig
from ..subnet.lease import EventType, Lease, LeaseAttrs, LeaseEvent
from ..subnet.manager import Manager
from . import IPV4_MIN_MTU, BackendError, Network
from .options import int_option

log = logging.getLogger(__name__)

DEFAULT_PORT = 8285
ENCAP_OVERHEAD = 28  # outer IPv4 (20) + UDP (8)
SOCKET_BUFFER = 4 << 20
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
SO_MEMINFO, SK_MEMINFO_DROPS = 55, 8  # the socket's own drop counter (a full receive buffer), as `ss -m` shows it
SOL_UDP, UDP_GRO = 17, 104  # not in Python's socket module
# The TUN's queue towards us (default 500) overflows in bursts while the pump is busy with the other direction; each
# overflow is a TCP loss inside the tunnel. A deeper queue absorbs the bursts.
TUN_TXQUEUELEN = 5000


def parse_options(backend: dict[str, Any]) -> int:
    return int_option(backend, "UDP", "Port", DEFAULT_PORT, 1, 65535)


def open_socket(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
        sock.bind((address, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise BackendError(f"UDP port {port} on {address} is already in use (is another flanneld running?)") from None
        raise BackendError(f"cannot bind the UDP socket to {address}:{port}: {e.strerror}") from None
    return sock


class UdpBackend:
    dual_stack = False  # IPv4 only, as upstream's udp backend

    def __init__(self, nl: netlink.Netlink, ext: ExternalInterface, config: NetworkConfig, source_check: bool = True,
                 offload: bool = True, priority: int = 0) -> None:
        if not config.enable_ipv4 or config.enable_ipv6:
            raise BackendError("the udp backend supports IPv4 only (set EnableIPv4 and leave EnableIPv6 off)")
        self.netlink = nl
        self.ext = ext
        self.config = config
        self.port = parse_options(config.backend)
        self.source_check = source_check
        self.offload = offload
        self.priority = priority

    async def register_network(self, manager: Manager) -> UdpNetwork:
        mtu = self.ext.mtu - ENCAP_OVERHEAD
        if mtu < IPV4_MIN_MTU:
            raise BackendError(f"the MTU of {self.ext.name} ({self.ext.mtu}) leaves {mtu} bytes for flannel0 after the "
                               f"{ENCAP_OVERHEAD}-byte UDP encapsulation, below IPv4's minimum of {IPV4_MIN_MTU}")
        # The socket first: a busy port must fail before anything is allocated or configured.
        sock = open_socket(str(self.ext.iface_addr), self.port)
        tun_fd = -1
        try:
            lease = await manager.acquire_lease(LeaseAttrs(self.ext.ext_addr))
            tun_fd, tun_name, tun_offloads = open_tun(offloads=self.offload)
            await self.netlink.call(configure_tun, tun_name, lease, mtu, str(self.config.network))
            accept_local_icmp(tun_name)
            log.info("%s is up: address %s/32, MTU %d, route %s; UDP on %s:%d", tun_name, lease.subnet.network_address,
                     mtu, self.config.network, self.ext.iface_addr, self.port)
            return UdpNetwork(lease, mtu, tun_fd, tun_name, sock, self.port, self.source_check, self.offload, tun_offloads,
                              self.priority)
        except BaseException:
            if tun_fd >= 0:
                os.close(tun_fd)  # the kernel removes the device, its address and its route
            sock.close()
            raise


def configure_tun(ipr, name: str, lease: Lease, mtu: int, network: str) -> None:
    """Upstream's configureIface: <subnet IP>/32, MTU = ext - 28, up, a route for the whole Network."""
    link = netlink.link_by_name(ipr, name)
    netlink.replace_address(ipr, link.index, str(lease.subnet.network_address), 32)
    netlink.set_link(ipr, link.index, mtu=mtu, up=True, txqlen=TUN_TXQUEUELEN)
    netlink.replace_route(ipr, network, oif=link.index)


def enable_gro(sock: socket.socket) -> bool:
    """UDP_GRO (Linux 5.0+): one receive may then carry a run of datagrams from one sender."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        return True
    except OSError as e:
        log.warning("UDP GRO unavailable (%s); receiving one datagram per message", e.strerror)
        return False


def accept_local_icmp(tun_name: str) -> None:
    """Let the kernel accept our ICMP net-unreachable, whose source (the subnet's .0, as upstream) is flannel0's own
    address: without accept_local Linux drops it as a martian source and the sender never learns the net is gone."""
    try:
        with open(f"/proc/sys/net/ipv4/conf/{tun_name}/accept_local", "w") as f:
            f.write("1")
    except OSError as e:
        log.warning("Cannot set accept_local on %s (%s): ICMP net-unreachable will not reach local senders", tun_name, e)


class UdpNetwork(Network):
    def __init__(self, lease: Lease, mtu: int, tun_fd: int, tun_name: str, sock: socket.socket, port: int,
                 source_check: bool, offload: bool, tun_offloads: int = 0, priority: int = 0) -> None:
        self.lease = lease
        self.mtu = mtu
        self.tun_fd = tun_fd
        self.tun_name = tun_name
        self.sock = sock
        self.port = port
        self.routes = RouteTable()
        gro = offload and enable_gro(sock)
        self.pump = Pump(tun_fd, sock.fileno(), self.routes, str(lease.subnet), source_check, gso=offload, gro=gro,
                         vnet_hdr=bool(tun_offloads))
        log.info("Offloads: UDP GSO %s, UDP GRO %s, TUN %s", "on" if offload else "off", "on" if gro else "off",
                 f"{tun_offloads:#x} (TSO split, TCP coalescing)" if tun_offloads else "off")
        self._gso_fallback_logged = False
        # The pump's own thread: its loop never takes the GIL, so nothing the control plane does in this interpreter
        # (watches, netlink, SQLite, metrics, garbage collection) delays a packet.
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.priority = priority
        self._thread = threading.Thread(target=self._run_pump, name="udp-pump", daemon=True)
        self._thread.start()

    def _run_pump(self) -> None:
        if self.priority:
            # Why: under load the pump competes for the CPU with the pods it serves; at ordinary priority it waits
            # its turn behind them, and so does every packet in the tunnel. The kernel's own tunnels run in softirq,
            # ahead of every thread; a real-time packet thread is the userspace equivalent. It sleeps in poll() when
            # idle, and the kernel's RT throttling keeps a share of each CPU for ordinary tasks even under a flood.
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self.priority))
                log.info("Packet thread runs at real-time priority %d (SCHED_FIFO)", self.priority)
            except OSError as e:
                log.warning("Cannot give the packet thread real-time priority %d (%s); it runs at ordinary priority",
                            self.priority, e.strerror)
        self.pump.run(self._stop_fd)

    def check_offload_fallback(self) -> None:
        if not self.pump.gso and self.pump.gso_error and not self._gso_fallback_logged:
            self._gso_fallback_logged = True
            log.warning("UDP GSO refused by the kernel (errno %d); sending one datagram per packet from now on",
                        self.pump.gso_error)

    async def apply(self, events: list[LeaseEvent]) -> None:
        for event in events:
            lease = event.lease
            if event.type is EventType.ADDED:
                # Every lease gets a route whatever its BackendType, as upstream.
                self.routes.set_route(lease.subnet, lease.attrs.public_ip, self.port)
                log.info("Route %s via %s:%d", lease.subnet, lease.attrs.public_ip, self.port)
            else:
                if self.routes.delete_route(lease.subnet):
                    log.info("Route %s removed", lease.subnet)

    def collect_metrics(self):
        self.check_offload_fallback()
        counters = self.pump.counters()
        packets = CounterMetricFamily("flannel_udp_peer_packets", "Packets exchanged with a peer node", labels=["peer", "direction"])
        octets = CounterMetricFamily("flannel_udp_peer_bytes", "Inner IP bytes exchanged with a peer node", labels=["peer", "direction"])
        for peer, (tx_p, tx_b, rx_p, rx_b) in self.routes.peer_stats().items():
            packets.add_metric([peer, "tx"], tx_p)
            packets.add_metric([peer, "rx"], rx_p)
            octets.add_metric([peer, "tx"], tx_b)
            octets.add_metric([peer, "rx"], rx_b)
        drops = CounterMetricFamily("flannel_udp_dropped_packets", "Packets dropped by the data plane, by reason",
                                    labels=["direction", "reason"])
        for direction in ("tun_to_udp", "udp_to_tun"):
            for reason, count in counters[f"drops_{direction}"].items():
                drops.add_metric([direction, reason], count)
        # Drops before the pump sees a packet: the kernel's counters of the two queues in front of it.
        drops.add_metric(["udp_to_tun", "socket_receive_buffer"], self.socket_drops())
        drops.add_metric(["tun_to_udp", "tun_queue"], self.tun_queue_drops())
        totals = CounterMetricFamily("flannel_udp_packets", "Packets through the data plane", labels=["stage"])
        for stage in ("tun_read_packets", "udp_sent_packets", "udp_received_packets", "tun_written_packets",
                      "icmp_unreachable_sent"):
            totals.add_metric([stage.removesuffix("_packets")], counters[stage])
        calls = CounterMetricFamily("flannel_udp_io_calls", "Readiness callbacks and batched syscalls (packets per call "
                                    "shows how well batching works)", labels=["kind"])
        for kind in ("tun_wakeups", "socket_wakeups", "send_batches", "receive_batches", "gso_sends", "gro_receives",
                     "tso_reads", "tso_segments", "tun_writes", "coalesced_writes"):
            calls.add_metric([kind], counters[kind])
        routes = GaugeMetricFamily("flannel_udp_routes", "Routes installed in the fast path")
        routes.add_metric([], len(self.routes))
        return [packets, octets, drops, totals, calls, routes]

    def socket_drops(self) -> int:
        meminfo = self.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * (SK_MEMINFO_DROPS + 1))
        return int.from_bytes(meminfo[4 * SK_MEMINFO_DROPS:4 * SK_MEMINFO_DROPS + 4], sys.byteorder)

    def tun_queue_drops(self) -> int:
        """Packets the kernel dropped because the TUN's queue towards the pump was full (its tx_dropped)."""
        try:
            with open(f"/sys/class/net/{self.tun_name}/statistics/tx_dropped") as f:
                return int(f.read())
        except (OSError, ValueError):
            return 0

    async def close(self) -> None:
        os.eventfd_write(self._stop_fd, 1)
        await asyncio.to_thread(self._thread.join)
        os.close(self._stop_fd)
        os.close(self.tun_fd)
        self.sock.close()
