"""The wireguard backend: upstream's `"Backend": {"Type": "wireguard"}`, carried by a userspace WireGuard (a TUN
named flannel-wg, the pump of _fastpath/wg.pyx, the handshakes of flannel_udp/wireguard), so it runs on kernels
without the WireGuard module and speaks the protocol to any WireGuard peer, upstream flanneld's kernel devices
included.

As upstream: options ListenPort (51820), ListenPortV6 (51821), MTU (the interface's), PSK, PersistentKeepaliveInterval
(seconds) and Mode; the private key in /run/flannel/wgkey (WIREGUARD_KEY_FILE), made once and reused; the lease's
BackendData {"PublicKey": ..., "Port": ...}; one peer per lease whose allowed IPs are the lease's subnet; flannel-wg
with <subnet>/32, MTU = MTU - 80, up, and a route for the whole Network. IPv4 networks only here: an IPv6 side is
refused in one line."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import threading
from typing import Any

from _fastpath.routes import RouteTable
from _fastpath.wg import WgPump, WgState
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..defaults import WIREGUARD_PORT
from ..net import netlink
from ..net.iface import ExternalInterface
from ..net.tun import open_tun_queues
from ..net.udp_socket import SocketError, enable_gro, open_socket
from ..subnet.config import NetworkConfig, lookup_key
from ..subnet.lease import Lease, LeaseAdded, LeaseAttrs, LeaseEvent
from ..subnet.manager import SubnetManager
from ..wireguard import keys, noise
from ..wireguard.device import TICK, WireguardDevice
from . import Backend, BackendError, BackendTypeFilter, Network, UdpFlags, room_after
from .options import int_option
from .udp import configure_tun

log = logging.getLogger(__name__)

OVERHEAD = 80  # upstream's: outer IPv6 header (the larger), UDP, type, index, counter, tag
DEVICE = "flannel-wg"
MODES = ("separate", "auto", "ipv4", "ipv6")


def parse_options(backend: dict[str, Any], ext_mtu: int) -> dict[str, Any]:
    """Upstream's options and defaults; a wrong one is refused in one line that names it."""
    options = {
        "port": int_option(backend, "wireguard", "ListenPort", WIREGUARD_PORT, 1, 65535),
        "port6": int_option(backend, "wireguard", "ListenPortV6", 51821, 1, 65535),
        "mtu": int_option(backend, "wireguard", "MTU", ext_mtu, 1, 65535),
        "keepalive": int_option(backend, "wireguard", "PersistentKeepaliveInterval", 0, 0, 65535),
        "psk": bytes(32),
    }
    psk = lookup_key(backend, "PSK", "")
    if not isinstance(psk, str):
        raise BackendError(f"error decoding wireguard backend config: PSK must be a string, got {psk!r}")
    if psk:
        try:
            options["psk"] = keys.parse_key(psk, "PSK")
        except keys.WireguardKeyError as e:
            raise BackendError(f"could not parse psk: {e}") from None
    mode = lookup_key(backend, "Mode", "separate")
    if mode not in MODES:
        raise BackendError("no valid Mode configured")
    return options


class WireguardBackend(Backend):
    backend_type = "wireguard"

    def __init__(self, nl: netlink.Netlink, ext: ExternalInterface, config: NetworkConfig, flags: UdpFlags) -> None:
        if config.enable_ipv6 or not config.enable_ipv4:
            raise BackendError("the wireguard backend carries IPv4 networks only: set EnableIPv6 false")
        if ext.iface_addr is None or ext.ext_addr is None:
            raise BackendError(f"the wireguard backend needs an IPv4 address on {ext.name}")
        self.netlink = nl
        self.ext = ext
        self.config = config
        self.flags = flags
        self.options = parse_options(config.backend, ext.mtu)

    async def register_network(self, manager: SubnetManager) -> WireguardNetwork:
        mtu = room_after(
            f"MTU {self.options['mtu']}", self.options["mtu"], OVERHEAD, "WireGuard encapsulation", 4, DEVICE
        )
        try:
            private = keys.load_or_create(keys.key_file())
        except keys.WireguardKeyError as e:
            raise BackendError(str(e)) from None
        identity = noise.Identity(private)
        try:
            sock = open_socket(str(self.ext.iface_addr), self.options["port"])
        except SocketError as e:
            raise BackendError(str(e)) from None
        try:
            assert self.ext.ext_addr is not None  # checked in __init__
            attrs = LeaseAttrs(
                self.ext.ext_addr,
                backend_type="wireguard",
                backend_data={"PublicKey": keys.encode_key(identity.public), "Port": self.options["port"]},
            )
            lease = await manager.acquire_lease(attrs)
            (tun_fd,), name, offloads = open_tun_queues(1, DEVICE, offloads=self.flags.offload)
            try:
                await self.netlink.call(configure_tun, name, lease, mtu, str(self.config.network), None)
                log.info(
                    "%s is up: address %s/32, MTU %d, route %s; WireGuard on %s:%d, public key %s",
                    name,
                    lease.subnet.network_address if lease.subnet else "-",
                    mtu,
                    self.config.network,
                    self.ext.iface_addr,
                    self.options["port"],
                    keys.encode_key(identity.public),
                )
                return WireguardNetwork(lease, mtu, identity, self.options, sock, tun_fd, offloads, self.flags)
            except BaseException:
                os.close(tun_fd)
                raise
        except BaseException:
            sock.close()
            raise


class WireguardNetwork(Network):
    """flannel-wg, its pump thread and the control plane of its handshakes."""

    def __init__(
        self,
        lease: Lease,
        mtu: int,
        identity: noise.Identity,
        options: dict[str, Any],
        sock: socket.socket,
        tun_fd: int,
        offloads: int,
        flags: UdpFlags,
    ) -> None:
        self.lease = lease
        self.mtu = mtu
        self.port = options["port"]
        self.sock = sock
        self.tun_fd = tun_fd
        self.routes = RouteTable()  # subnet -> peer: where a packet goes, and whose keys may send from it
        self._types = BackendTypeFilter("wireguard")
        self._peer_of: dict[ipaddress.IPv4Network, bytes] = {}  # a lease's subnet -> its public key
        self._notice_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.state = WgState(self.routes, self._notice_fd)
        self.device = WireguardDevice(identity, options["psk"], self.state, sock, float(options["keepalive"]))
        gro = flags.offload and enable_gro(sock)
        self.pump = WgPump(
            tun_fd,
            sock.fileno(),
            self.routes,
            self.state,
            str(lease.subnet),
            gso=flags.offload,
            gro=gro,
            vnet_hdr=bool(offloads),
            notify_fd=self._notice_fd,
        )
        asyncio.get_running_loop().add_reader(self._notice_fd, self._on_notice)
        self._thread = threading.Thread(target=self.pump.run, args=(self._stop_fd,), name="wg-pump", daemon=True)
        self._thread.start()

    def _on_notice(self) -> None:
        try:
            os.eventfd_read(self._notice_fd)
        except BlockingIOError:
            pass
        self.device.on_notice()

    async def supervise(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.device.tick()

    async def apply(self, events: list[LeaseEvent]) -> None:
        for event in events:
            if not self._types.accepts(event):
                continue
            if isinstance(event, LeaseAdded):
                self._add_peer(event.lease)
                continue
            public = self._peer_of.pop(event.subnet, None) if event.subnet is not None else None
            if public is not None:
                self.device.remove_peer(public)
                self.routes.delete_route(event.subnet)
                log.info("Subnet removed: %s", event.subnet)

    def _add_peer(self, lease: Lease) -> None:
        if lease.subnet is None:  # an IPv6-only lease: nothing this IPv4 device can carry
            return
        data = lease.attrs.backend_data if isinstance(lease.attrs.backend_data, dict) else {}
        try:
            public = keys.parse_key(str(lookup_key(data, "PublicKey", "")), "PublicKey")
        except keys.WireguardKeyError as e:
            log.error("Ignoring the lease of %s: its BackendData %s", lease.subnet, e)
            return
        port = lookup_key(data, "Port", 0)
        port = port if isinstance(port, int) and 0 < port < 65536 else self.port  # older upstream leases: ours
        old = self._peer_of.get(lease.subnet)
        if old is not None and old != public:
            self.device.remove_peer(old)
        self.routes.set_route(lease.subnet, lease.attrs.public_ip, port)
        self._peer_of[lease.subnet] = public
        self.device.set_peer(public, self.routes.peer_index(lease.subnet), (str(lease.attrs.public_ip), port))
        log.info("Subnet added: %s via %s:%d", lease.subnet, lease.attrs.public_ip, port)

    def collect_metrics(self):
        counters = self.pump.counters()
        packets = CounterMetricFamily(
            "flannel_udp_wireguard_packets", "Packets through flannel-wg, by stage", labels=["stage"]
        )
        for stage in (
            "tun_read_packets",
            "udp_sent_packets",
            "udp_received_packets",
            "tun_written_packets",
            "keepalives_received",
            "handshake_messages",
        ):
            packets.add_metric([stage], counters[stage])
        drops = CounterMetricFamily(
            "flannel_udp_wireguard_drops", "Packets and datagrams dropped, by reason", labels=["direction", "reason"]
        )
        for direction, key in (("tun_to_udp", "drops_tun_to_udp"), ("udp_to_tun", "drops_udp_to_tun")):
            for reason, value in sorted(counters[key].items()):
                drops.add_metric([direction, reason], value)
        for reason, value in sorted(self.device.stats.items()):
            if reason.startswith("drop_"):
                drops.add_metric(["handshake", reason[5:]], value)
        handshakes = CounterMetricFamily(
            "flannel_udp_wireguard_handshake_events",
            "Handshake messages sent and handshakes completed",
            labels=["event"],
        )
        for event, value in sorted(self.device.stats.items()):
            if not event.startswith("drop_"):
                handshakes.add_metric([event], value)
        peers = GaugeMetricFamily("flannel_udp_wireguard_peers", "WireGuard peers (one per lease)")
        peers.add_metric([], len(self.device.peers))
        return [packets, drops, handshakes, peers]

    async def close(self) -> None:
        os.eventfd_write(self._stop_fd, 1)
        await asyncio.to_thread(self._thread.join)
        asyncio.get_running_loop().remove_reader(self._notice_fd)
        os.close(self._notice_fd)
        os.close(self._stop_fd)
        self.sock.close()
        os.close(self.tun_fd)  # the TUN goes with its last fd: its address and route with it
