"""The vxlan backend (upstream pkg/backend/vxlan): the kernel encapsulates; this module keeps its state in line.

Device flannel.<VNI> (local = public IP, on the external interface, no learning), then per remote vxlan lease a
permanent neighbour entry (remote subnet IP -> its VTEP MAC), an FDB entry (that MAC -> the remote public IP) and an
onlink route to the remote subnet via its subnet IP, in that order and undone in reverse if a step fails. With
DirectRouting a peer on the same link gets a plain route via its public IP instead. A watchdog recreates a deleted
device and replays every peer (upstream forgets them).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..net import netlink
from ..net.iface import ExternalInterface
from ..subnet.config import NetworkConfig, lookup_key
from ..subnet.lease import EventType, Lease, LeaseAttrs, LeaseEvent
from ..subnet.manager import Manager
from . import BackendError, Network
from .options import bool_option, int_option

log = logging.getLogger(__name__)

ENCAP_OVERHEAD = 50  # outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14)
IPV4_MIN_MTU = 68
WATCHDOG_PERIOD = 0.5
STEP_RETRIES = 5


@dataclass(frozen=True)
class VxlanOptions:
    vni: int
    port: int  # 0: the kernel's default (8472)
    mtu: int   # of the underlay; the device gets mtu - 50
    gbp: bool
    learning: bool
    direct_routing: bool


def parse_options(backend: dict, ext_mtu: int) -> VxlanOptions:
    name = "VXLAN"
    mtu = int_option(backend, name, "MTU", ext_mtu, -(1 << 31), 1 << 31)
    if mtu - ENCAP_OVERHEAD < IPV4_MIN_MTU:
        raise BackendError(f"error decoding VXLAN backend config: MTU {mtu} leaves {mtu - ENCAP_OVERHEAD} bytes for "
                           f"pods after the {ENCAP_OVERHEAD}-byte VXLAN overhead, below IPv4's minimum of {IPV4_MIN_MTU}")
    return VxlanOptions(vni=int_option(backend, name, "VNI", 1, 0, (1 << 24) - 1),
                        port=int_option(backend, name, "Port", 0, 0, 65535), mtu=mtu,
                        gbp=bool_option(backend, name, "GBP"), learning=bool_option(backend, name, "Learning"),
                        direct_routing=bool_option(backend, name, "DirectRouting"))


def random_mac() -> str:
    """A random unicast, locally administered MAC (upstream pkg/mac)."""
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


class VxlanBackend:
    backend_type = "vxlan"

    def __init__(self, nl: netlink.Netlink, ext: ExternalInterface, config: NetworkConfig, **_unused) -> None:
        if not config.enable_ipv4 or config.enable_ipv6:
            raise BackendError("this vxlan backend supports IPv4 only (set EnableIPv4 and leave EnableIPv6 off)")
        self.netlink = nl
        self.ext = ext
        self.config = config
        self.options = parse_options(config.backend, ext.mtu)
        self.device = f"flannel.{self.options.vni}"

    async def register_network(self, manager: Manager) -> VxlanNetwork:
        # The device comes first: its MAC goes into the lease.
        index, mac = await self.netlink.call(ensure_device, self.device, self.options, self.ext)
        attrs = LeaseAttrs(self.ext.ext_addr, backend_type=self.backend_type,
                           backend_data={"VNI": self.options.vni, "VtepMAC": mac})
        lease = await manager.acquire_lease(attrs)
        await self.netlink.call(configure_device, index, lease, self.config.network, mac)
        log.info("%s is up: VNI %d, MAC %s, address %s/32, MTU %d", self.device, self.options.vni, mac,
                 lease.subnet.network_address, self.options.mtu - ENCAP_OVERHEAD)
        return VxlanNetwork(self.netlink, lease, self.device, index, mac, self.options, self.ext, self.config)


def ensure_device(ipr, name: str, opts: VxlanOptions, ext: ExternalInterface, mac: str | None = None) -> tuple[int, str]:
    """Reuse a compatible flannel.<VNI> (keeping its MAC, so peers' FDB entries stay right); recreate one that is not."""
    mtu = opts.mtu - ENCAP_OVERHEAD
    existing = netlink.vxlan_info(ipr, name)
    if existing:
        compatible = (existing.vni == opts.vni and existing.local in (None, str(ext.ext_addr))
                      and existing.link in (None, 0, ext.index) and (not opts.port or existing.port in (0, opts.port))
                      and existing.gbp == opts.gbp and existing.learning == opts.learning)
        if compatible:
            netlink.set_link(ipr, existing.index, mtu=mtu)
            return existing.index, existing.mac
        log.warning("%s exists but does not match the configuration; recreating it", name)
    if existing is not None:
        netlink.delete_link(ipr, ipr.link_lookup(ifname=name)[0])
    mac = mac or random_mac()
    index = netlink.create_vxlan(ipr, name, opts.vni, str(ext.ext_addr), ext.index, opts.port, opts.learning, opts.gbp,
                                 mac, mtu)
    netlink.write_sysctl(f"net/ipv6/conf/{name}/accept_ra", "0")
    return index, mac


def configure_device(ipr, index: int, lease: Lease, network: ipaddress.IPv4Network, mac: str) -> None:
    """<subnet IP>/32 (other addresses inside the Network removed), up, and the MAC the lease advertises."""
    netlink.keep_only_address(ipr, index, str(lease.subnet.network_address), 32, network)
    netlink.set_link(ipr, index, up=True)
    actual = ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")
    if actual != mac:
        raise BackendError(f"flannel device MAC {actual} differs from the advertised {mac}")


@dataclass(frozen=True)
class PeerState:
    subnet: ipaddress.IPv4Network
    public_ip: str
    mac: str | None  # None: reached by a direct route


class VxlanNetwork(Network):
    def __init__(self, nl: netlink.Netlink, lease: Lease, device: str, index: int, mac: str, options: VxlanOptions,
                 ext: ExternalInterface, config: NetworkConfig) -> None:
        self.netlink = nl
        self.lease = lease
        self.mtu = options.mtu - ENCAP_OVERHEAD
        self.device = device
        self.index = index
        self.mac = mac
        self.options = options
        self.ext = ext
        self.config = config
        self.peers: dict[ipaddress.IPv4Network, PeerState] = {}
        self.device_recreations = 0
        self._ignored_types: set[str] = set()
        self._lock = asyncio.Lock()  # lease events and the watchdog's replay never interleave
        self._watchdog = asyncio.get_running_loop().create_task(self._watch_device())

    async def apply(self, events: list[LeaseEvent]) -> None:
        async with self._lock:
            for event in events:
                lease = event.lease
                if event.type is EventType.ADDED:
                    peer = self._peer_from(lease)
                    if peer is None:
                        continue
                    old = self.peers.get(lease.subnet)
                    if old is not None and old != peer:
                        await self._remove(old)
                    if await self._add(peer):
                        self.peers[lease.subnet] = peer
                elif lease.subnet in self.peers:
                    await self._remove(self.peers.pop(lease.subnet))

    def _peer_from(self, lease: Lease) -> PeerState | None:
        attrs = lease.attrs
        if attrs.backend_type != "vxlan":
            if attrs.backend_type not in self._ignored_types:
                self._ignored_types.add(attrs.backend_type)
                log.warning("Ignoring leases of backend type %r (this node runs vxlan), e.g. %s",
                            attrs.backend_type or "udp", lease.subnet)
            return None
        data = attrs.backend_data if isinstance(attrs.backend_data, dict) else {}
        mac = lookup_key(data, "VtepMAC")  # case-insensitive, as Go decodes it upstream
        if not isinstance(mac, str) or len(mac.split(":")) != 6:
            log.error("Ignoring vxlan lease %s: BackendData has no valid VtepMAC (%r)", lease.subnet, attrs.backend_data)
            return None
        return PeerState(lease.subnet, str(attrs.public_ip), mac.lower())

    async def _directly_connected(self, public_ip: str) -> bool:
        route = await self.netlink.call(netlink.route_get, public_ip)
        return route is not None and route["gateway"] is None and route["oif"] == self.ext.index

    async def _add(self, peer: PeerState) -> bool:
        """neighbour, FDB, route, each retried; a failure undoes the steps before it."""
        subnet, gateway = str(peer.subnet), str(peer.subnet.network_address)
        if self.options.direct_routing and await self._directly_connected(peer.public_ip):
            await self.netlink.call(netlink.replace_route, subnet, gateway=peer.public_ip)
            log.info("Direct route %s via %s", subnet, peer.public_ip)
            return True
        steps = [
            (netlink.replace_neighbour, (self.index, gateway, peer.mac), netlink.delete_neighbour, (self.index, gateway, peer.mac)),
            (netlink.replace_fdb, (self.index, peer.mac, peer.public_ip), netlink.delete_fdb, (self.index, peer.mac, peer.public_ip)),
            (route_via_device, (subnet, self.index, gateway), netlink.delete_route, (subnet,)),
        ]
        done = []
        for do, do_args, undo, undo_args in steps:
            if not await self._retry(do, *do_args):
                for undo_fn, args in reversed(done):
                    await self._quietly(undo_fn, *args)
                log.error("Cannot add vxlan peer %s (%s, %s); undone", subnet, peer.public_ip, peer.mac)
                return False
            done.append((undo, undo_args))
        log.info("Peer %s via %s (VTEP %s)", subnet, peer.public_ip, peer.mac)
        return True

    async def _remove(self, peer: PeerState) -> None:
        subnet, gateway = str(peer.subnet), str(peer.subnet.network_address)
        await self._quietly(netlink.delete_route, subnet)
        await self._quietly(netlink.delete_neighbour, self.index, gateway, peer.mac)
        await self._quietly(netlink.delete_fdb, self.index, peer.mac, peer.public_ip)
        log.info("Peer %s removed", subnet)

    async def _retry(self, fn, *args) -> bool:
        delay = 0.05
        for attempt in range(STEP_RETRIES):
            try:
                await self.netlink.call(fn, *args)
                return True
            except (netlink.NetlinkError, OSError) as e:
                if attempt == STEP_RETRIES - 1:
                    log.error("%s%r failed: %s", fn.__name__, args, e)
                    return False
                await asyncio.sleep(delay)
                delay *= 2
        return False

    async def _quietly(self, fn, *args) -> None:
        try:
            await self.netlink.call(fn, *args)
        except (netlink.NetlinkError, OSError) as e:
            log.debug("%s%r: %s", fn.__name__, args, e)

    async def _watch_device(self) -> None:
        """Recreate a deleted (or replaced) flannel.<VNI> with the same MAC and replay every peer."""
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD)
            try:
                info = await self.netlink.call(netlink.vxlan_info, self.device)
                if info and info.index == self.index:
                    continue
                async with self._lock:
                    log.warning("%s disappeared; recreating it and replaying %d peers", self.device, len(self.peers))
                    self.index, _ = await self.netlink.call(ensure_device, self.device, self.options, self.ext, self.mac)
                    await self.netlink.call(configure_device, self.index, self.lease, self.config.network, self.mac)
                    for peer in list(self.peers.values()):
                        await self._add(peer)
                    self.device_recreations += 1
            except (netlink.NetlinkError, OSError, BackendError) as e:
                log.error("Cannot recreate %s (trying again): %s", self.device, e)

    def collect_metrics(self):
        peers = GaugeMetricFamily("flannel_backend_routes", "Routes to peer subnets installed by the backend")
        peers.add_metric([], len(self.peers))
        recreated = CounterMetricFamily("flannel_vxlan_device_recreations", "Times the watchdog recreated the device")
        recreated.add_metric([], self.device_recreations)
        return [peers, recreated]

    async def close(self) -> None:
        # Nothing is removed on exit, as upstream: the kernel keeps forwarding across a restart.
        self._watchdog.cancel()


def route_via_device(ipr, subnet: str, index: int, gateway: str) -> None:
    netlink.replace_route(ipr, subnet, oif=index, gateway=gateway, onlink=True)
