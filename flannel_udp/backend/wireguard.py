"""The wireguard backend: upstream's `"Backend": {"Type": "wireguard"}`, carried by a userspace WireGuard (TUN devices,
the pump of _fastpath/wg.pyx, the handshakes of flannel_udp/wireguard), so it runs on kernels without the WireGuard
module and speaks the protocol to any WireGuard peer, upstream flanneld's kernel devices included.

As upstream: options ListenPort (51820), ListenPortV6 (51821), MTU (the interface's), PSK, PersistentKeepaliveInterval
(seconds) and Mode; the private key in /run/flannel/wgkey (WIREGUARD_KEY_FILE), made once and reused; the lease's
BackendData / BackendV6Data {"PublicKey": ..., "Port": ...}; one peer per lease whose allowed IPs are the lease's
subnets. Mode "separate" (the default) gives each family a device of its own: flannel-wg (IPv4 pods, IPv4 underlay,
ListenPort) and flannel-wg-v6 (IPv6 pods, IPv6 underlay, ListenPortV6). Modes "auto", "ipv4" and "ipv6" put both
families on flannel-wg and reach each peer on one of its addresses (auto: upstream's choice). Each device gets the
subnets' network addresses (/32, /128), MTU = MTU - 80, and a route for each Network it carries."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..defaults import WIREGUARD_PORT, WIREGUARD_PORT_V6
from ..net import netlink
from ..net.iface import ExternalInterface
from ..net.tun import open_tun_queues
from ..net.udp_socket import SocketError, open_socket
from ..subnet.config import NetworkConfig, lookup_key
from ..subnet.lease import NO_PUBLIC_IP, Lease, LeaseAdded, LeaseAttrs, LeaseEvent
from ..subnet.manager import SubnetManager
from ..wireguard import keys, noise
from ..wireguard.device import TICK, Timers, where
from . import Backend, BackendError, BackendTypeFilter, Network, UdpFlags, check_families, room_after
from .options import int_option
from .udp import configure_tun
from .udp_lanes import steer_tun_flows
from .wireguard_link import Address, Lane, LinkPlan, WgLink, metric_families

log = logging.getLogger(__name__)

OVERHEAD = 80  # upstream's: outer IPv6 header (the larger), UDP, type, index, counter, tag
DEVICE, DEVICE6 = "flannel-wg", "flannel-wg-v6"
MODES = ("separate", "auto", "ipv4", "ipv6")


def parse_options(backend: dict[str, Any], ext_mtu: int) -> dict[str, Any]:
    """Upstream's options and defaults; a wrong one is refused in one line that names it."""
    options = {
        "port": int_option(backend, "wireguard", "ListenPort", WIREGUARD_PORT, 1, 65535),
        "port6": int_option(backend, "wireguard", "ListenPortV6", WIREGUARD_PORT_V6, 1, 65535),
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
    options["mode"] = mode
    return options


def link_plans(config: NetworkConfig, mode: str) -> list[LinkPlan]:
    """The devices a mode makes for the network's families."""
    families = tuple(family for family, on in ((4, config.enable_ipv4), (6, config.enable_ipv6)) if on)
    if mode == "separate":
        return [LinkPlan(DEVICE if family == 4 else DEVICE6, (family,), f"ipv{family}") for family in families]
    return [LinkPlan(DEVICE, families, mode)]


class WireguardBackend(Backend):
    backend_type = "wireguard"
    dual_stack = True

    def __init__(self, nl: netlink.Netlink, ext: ExternalInterface, config: NetworkConfig, flags: UdpFlags) -> None:
        check_families(config, ext)
        self.netlink = nl
        self.ext = ext
        self.config = config
        self.flags = flags
        self.options = parse_options(config.backend, ext.mtu)
        try:
            self.options["timers"] = Timers.from_environment()
        except ValueError as e:
            raise BackendError(str(e)) from None
        self.plans = link_plans(config, self.options["mode"])
        for plan in self.plans:
            if not self.underlay(plan):
                family = "IPv6" if plan.endpoints == "ipv6" else "IPv4"
                raise BackendError(f"the wireguard backend's {plan.name} needs an {family} address on {ext.name}")

    def underlay(self, plan: LinkPlan) -> list[int]:
        """The underlay families a device has a socket for: its mode's, or in "auto" each the node has."""
        have = [family for family, address in ((4, self.ext.iface_addr), (6, self.ext.iface_addr6)) if address]
        return have if plan.endpoints == "auto" else [f for f in have if f"ipv{f}" == plan.endpoints]

    def lease_attrs(self, public: bytes) -> LeaseAttrs:
        """Upstream's: each family's BackendData names the key and that family's listening port."""
        key = keys.encode_key(public)
        config = self.config
        return LeaseAttrs(
            self.ext.ext_addr or NO_PUBLIC_IP,
            self.ext.ext_addr6 if config.enable_ipv6 else None,
            backend_type="wireguard",
            backend_data={"PublicKey": key, "Port": self.options["port"]} if config.enable_ipv4 else None,
            backend_v6_data={"PublicKey": key, "Port": self.options["port6"]} if config.enable_ipv6 else None,
        )

    def open_lanes(self, plan: LinkPlan) -> list[Lane]:
        """The sockets of each packet thread: one per underlay family, IPv4 on ListenPort, IPv6 on ListenPortV6 (the
        ports the lease names), shared by the threads as a SO_REUSEPORT group. A port already in use is refused, even
        by a user that shares it, so that two node agents never split one port's traffic. TUN queues come later."""
        workers = self.flags.worker_count()
        lanes = [Lane(-1, {}) for _ in range(workers)]
        try:
            for family in self.underlay(plan):
                address = str(self.ext.iface_addr if family == 4 else self.ext.iface_addr6)
                port = self.options["port"] if family == 4 else self.options["port6"]
                if workers > 1:
                    open_socket(address, port).close()
                for lane in lanes:
                    lane.sockets[family] = open_socket(address, port, reuse_port=workers > 1)
        except SocketError as e:
            for lane in lanes:
                lane.close()
            raise BackendError(str(e)) from None
        return lanes

    async def register_network(self, manager: SubnetManager) -> WireguardNetwork:
        carries6 = any(6 in plan.carries for plan in self.plans)
        mtu = room_after(
            f"MTU {self.options['mtu']}",
            self.options["mtu"],
            OVERHEAD,
            "WireGuard encapsulation",
            6 if carries6 else 4,
            self.plans[0].name,
        )
        try:
            private = keys.load_or_create(keys.key_file())
        except keys.WireguardKeyError as e:
            raise BackendError(str(e)) from None
        identity = noise.Identity(private)
        lanes = [self.open_lanes(plan) for plan in self.plans]
        links: list[WgLink] = []
        try:
            lease = await manager.acquire_lease(self.lease_attrs(identity.public))
            for plan, plan_lanes in zip(self.plans, lanes, strict=True):
                links.append(await self._start_link(plan, plan_lanes, lease, mtu, identity))
            return WireguardNetwork(lease, mtu, links)
        except BaseException:
            for link in links:
                await link.close()
            for plan_lanes in lanes[len(links) :]:
                for lane in plan_lanes:
                    lane.close()
            raise

    async def _start_link(
        self, plan: LinkPlan, lanes: list[Lane], lease: Lease, mtu: int, identity: noise.Identity
    ) -> WgLink:
        """Make and configure one device (a TUN queue per lane), then start its pumps."""
        config = self.config
        network = str(config.network) if 4 in plan.carries else None
        network6 = str(config.ipv6_network) if 6 in plan.carries else None
        tun_fds, name, offloads = open_tun_queues(len(lanes), plan.name, offloads=self.flags.offload)
        for lane, fd in zip(lanes, tun_fds, strict=True):
            lane.tun_fd = fd
        steer_tun_flows(name, tun_fds)
        await self.netlink.call(configure_tun, name, lease, mtu, network, network6)
        families = lanes[0].sockets
        public: dict[int, Address] = {f: a for f, a in ((4, self.ext.ext_addr), (6, self.ext.ext_addr6)) if a}
        link = WgLink(
            plan,
            lease,
            identity,
            self.options,
            lanes,
            {family: public[family] for family in families if family in public},
            mtu,
            offloads,
            self.flags.offload,
        )
        ports = {4: self.options["port"], 6: self.options["port6"]}
        addresses = {4: self.ext.iface_addr, 6: self.ext.iface_addr6}
        listening = ", ".join(where((str(addresses[family]), ports[family])) for family in families)
        log.info(
            "%s is up: MTU %d, routes %s; WireGuard on %s, %d packet thread%s, public key %s",
            name,
            mtu,
            ", ".join(n for n in (network, network6) if n),
            listening,
            len(lanes),
            "" if len(lanes) == 1 else "s",
            keys.encode_key(identity.public),
        )
        return link


class WireguardNetwork(Network):
    """The backend's devices (one, or one per family) following the lease events."""

    def __init__(self, lease: Lease, mtu: int, links: list[WgLink]) -> None:
        self.lease = lease
        self.mtu = mtu
        self.links = links
        self._types = BackendTypeFilter("wireguard")

    async def supervise(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            for link in self.links:
                link.tick()

    async def apply(self, events: list[LeaseEvent]) -> None:
        for event in events:
            if not self._types.accepts(event):
                continue
            for link in self.links:
                if isinstance(event, LeaseAdded):
                    link.add_peer(event.lease)
                else:
                    link.remove_peer(event.primary)

    def collect_metrics(self):
        families = metric_families()
        for link in self.links:
            link.add_metrics(*families)
        return list(families)

    async def close(self) -> None:
        for link in self.links:
            await link.close()
