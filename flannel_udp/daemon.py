"""The node agent: composes config, store, interface, backend and health, then follows lease events until stopped."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from dataclasses import dataclass, field

from . import defaults
from .backend import Backend, BackendError, Network, UdpFlags, backend_class, make_backend
from .bridge_guard import BridgeGuard
from .health import HealthError, HealthServer, NodeState
from .net import iface, netlink
from .net.rules import FamilyNetworks, RulesError, TrafficRules
from .net.tun import TunError
from .net.udp_socket import SocketError
from .subnet import subnetenv
from .subnet.allocation import OutOfSubnets
from .subnet.config import ConfigError, NetworkConfig, load_config, parse_config
from .subnet.etcd.client import EtcdConfigError, EtcdOptions
from .subnet.kube.client import KubeOptions
from .subnet.lease import Lease
from .subnet.manager import DEFAULT_LEASE_TTL, AcquireError, Manager, SubnetManager, previous_subnet_from
from .subnet.registry import StoreError, StoreUnavailable
from .subnet.source import LeaseSource
from .subnet.watcher import LeaseRevoked, LeaseStream

log = logging.getLogger(__name__)

RENEW_RETRY = 60.0
STORE_RETRY = 1.0


class StartupError(RuntimeError):
    """A failure the user can fix; printed as one line, exit status 1."""


class ServingError(StartupError):
    """A fault after start-up that nothing handles: the node stops as a signal would stop it, then says why in one
    line and exits with status 1."""


# What a start can fail on that the user can cause: each ends the node in one line, exit status 1.
STARTUP_ERRORS = (
    SocketError,
    iface.InterfaceError,
    BackendError,
    TunError,
    StoreError,
    OutOfSubnets,
    AcquireError,
    EtcdConfigError,
    RulesError,
    HealthError,
)


@dataclass
class Options:
    net_config_path: str = defaults.NET_CONFIG_PATH
    subnet_file: str = defaults.SUBNET_FILE
    lease_file: str = defaults.LEASE_FILE
    lease_ttl: float = DEFAULT_LEASE_TTL
    iface: list[str] = field(default_factory=list)
    iface_regex: list[str] = field(default_factory=list)
    iface_can_reach: str = ""
    public_ip: str = ""
    public_ipv6: str = ""
    subnet_lease_renew_margin: int = 60  # minutes
    ip_masq: bool = False
    ip_masq_fully_random_disable: bool = False
    iptables_forward_rules: bool = True
    iptables_resync: int = 5
    ip_blackhole_route: bool = False
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    udp_source_check: bool = True
    udp_offload: bool = True
    udp_priority: int = 0
    udp_busy_poll: int = 0  # microseconds
    udp_workers: int = 0  # packet threads; 0: one per CPU the process may run on (capped)
    cni_bridge_repair: bool = True
    cni_data_dir: str = defaults.CNI_DATA_DIR
    etcd: EtcdOptions | None = None  # None: the embedded store (lease_file) and the config from net_config_path
    kube: KubeOptions | None = None  # -kube-subnet-mgr: leases are the Nodes' podCIDRs and annotations


def read_network_config(path: str, kube: bool = False) -> NetworkConfig:
    """net-conf.json, checked as upstream checks it in etcd mode. Kube mode (as upstream) only parses it: SubnetLen and
    the like mean nothing when Kubernetes assigns the subnets, but the networks the podCIDRs lie in must be there."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise StartupError(f"failed to read net conf {path}: {e.strerror}") from None
    if not kube:
        try:
            return load_config(text)
        except ConfigError as e:
            raise StartupError(f"invalid net conf {path}: {e}") from None
    try:
        config = parse_config(text)
    except ConfigError as e:
        raise StartupError(f"error parsing subnet config {path}: {e}") from None
    if config.enable_ipv4 and config.network is None:
        raise StartupError(f"error parsing subnet config {path}: no Network (the cluster CIDR the podCIDRs lie in)")
    if config.enable_ipv6 and config.ipv6_network is None:
        raise StartupError(f"error parsing subnet config {path}: EnableIPv6 is set but there is no IPv6Network")
    return config


def checked_families(config: NetworkConfig, etcd: bool = False) -> NetworkConfig:
    """The address families of a config, refused before any store is reached: none at all (upstream's GetIPFamily),
    or IPv6 alone on etcd, whose key schema (upstream's) always starts with an IPv4 subnet."""
    if not config.enable_ipv4 and not config.enable_ipv6:
        raise StartupError("none defined stack: the network config turns off both EnableIPv4 and EnableIPv6")
    if etcd and not config.enable_ipv4:
        raise StartupError(
            "IPv6-only networks are not supported with etcd (its network config has EnableIPv4 false): "
            "upstream's subnet keys always carry an IPv4 subnet; use the Kubernetes subnet "
            "manager or the embedded store, or set EnableIPv4 (dual stack)"
        )
    return config


async def read_etcd_network_config(registry) -> NetworkConfig:
    """<prefix>/config, tried once a second while it is missing or etcd is out of reach, as upstream's getConfig."""
    from .subnet.etcd.registry import ConfigNotFound

    last_cause = None  # said once per cause (etcd away, config missing), whatever wording gRPC rotates through
    while True:
        try:
            text = await registry.get_network_config()
        except (StoreUnavailable, ConfigNotFound) as e:
            cause = type(e)
            if cause is not last_cause:
                log.error("Couldn't fetch network config: %s (trying again every second)", e)
                last_cause = cause
            log.debug("Network config not fetched yet: %s", e)
        except StoreError as e:  # refused credentials and the like: waiting will not help
            raise StartupError(str(e)) from None
        else:
            if last_cause is not None:
                log.info("Fetched the network config from %s", registry.config_key)
            try:
                return load_config(text)
            except ConfigError as e:
                raise StartupError(f"invalid network config in etcd at {registry.config_key}: {e}") from None
        await asyncio.sleep(STORE_RETRY)


async def open_manager(opts: Options, previous: tuple) -> tuple[SubnetManager, NetworkConfig]:
    """Where leases come from, and the network config: the embedded file store or etcd (Registries under a Manager,
    which knows the previous subnet from subnet.env), or the Kubernetes API (a KubeManager)."""
    if opts.kube is not None:
        from .subnet.kube.manager import KubeManager  # the Kubernetes client is loaded only in kube mode

        config = checked_families(read_network_config(opts.net_config_path, kube=True))
        return await KubeManager.open(opts.kube, config), config
    source = LeaseSource(opts.lease_file, opts.etcd)  # the same way to a store as the tools take
    if opts.etcd is None:
        config = checked_families(read_network_config(opts.net_config_path))  # before the lease file is created
        return Manager(source.open_registry(create=True), config, previous, opts.lease_ttl), config
    registry = source.open_registry()
    try:
        config = checked_families(await read_etcd_network_config(registry), etcd=True)
    except BaseException:
        await registry.close()
        raise
    return Manager(registry, config, previous, opts.lease_ttl), config


def rule_families(config: NetworkConfig, lease: Lease, old_env: dict, previous) -> list[FamilyNetworks]:
    """The networks each family's rules are about; the networks of an old subnet.env, whose masquerade rules may be
    stale. A family the network does not carry gets no rules at all."""
    families = []
    if config.enable_ipv4 and lease.subnet is not None and config.network is not None:
        families.append(
            FamilyNetworks(config.network, lease.subnet, subnetenv.single(old_env, "FLANNEL_NETWORK"), previous[0])
        )
    if config.enable_ipv6 and lease.ipv6_subnet is not None and config.ipv6_network is not None:
        families.append(
            FamilyNetworks(
                config.ipv6_network,
                lease.ipv6_subnet,
                subnetenv.single(old_env, "FLANNEL_IPV6_NETWORK"),
                previous[1],
            )
        )
    return families


async def choose_interface(
    nl: netlink.Netlink,
    opts: Options,
    public_ip: str,
    public_ipv6: str,
    ipv6: bool,
    ipv6_optional: bool,
    ipv4: bool = True,
) -> iface.ExternalInterface:
    """The external interface (and with ipv6 its IPv6 side; without ipv4 only that side). Where the backend can carry
    IPv6 pod traffic over the IPv4 underlay, an interface without an IPv6 address is not an error unless an IPv6
    underlay was asked for by name."""
    args = (opts.iface, opts.iface_regex, opts.iface_can_reach, public_ip, public_ipv6)
    if not ipv4:
        return await nl.call(iface.choose, *args, True, False)
    asked_for_ipv6 = bool(public_ipv6) or any(":" in value for value in opts.iface)
    if ipv6 and ipv6_optional and not asked_for_ipv6:
        try:
            ext = await nl.call(iface.choose, *args, True)
            if not ext.iface_addr6.is_link_local:
                return ext
            reason = f"{ext.name} has only the link-local {ext.iface_addr6}, which peers on other links cannot reach"
            ext = dataclasses.replace(ext, iface_addr6=None, ext_addr6=None)
        except iface.InterfaceError as e:
            reason = str(e)
            ext = await nl.call(iface.choose, *args, False)
        log.info("No IPv6 underlay (%s): IPv6 pod traffic crosses the IPv4 underlay", reason)
        return ext
    return await nl.call(iface.choose, *args, ipv6)


class Daemon:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.state = NodeState()
        self.stopping = asyncio.Event()
        self._starting: asyncio.Task | None = None  # cancelled by a signal that arrives before start-up is done

    async def run(self) -> int:
        """0 after a clean stop (signal or revoked lease), as upstream; raises StartupError for user-fixable faults.
        A signal during start-up (waiting for etcd or the API server, acquiring the lease) ends it at once."""
        self._starting = asyncio.current_task()
        try:
            return await self._run()
        except asyncio.CancelledError:
            if not self.stopping.is_set():
                raise
            log.info("Exiting cleanly...")
            return 0

    async def _run(self) -> int:
        opts = self.opts
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

        health = HealthServer(self.state, opts.healthz_ip, opts.healthz_port) if opts.healthz_port > 0 else None
        nl = netlink.Netlink()
        manager: SubnetManager | None = None
        network: Network | None = None
        try:
            if health is not None:
                await health.start()
            old_env = subnetenv.read(opts.subnet_file)
            previous = previous_subnet_from(old_env)
            manager, config = await open_manager(opts, previous)
            backend_cls = backend_class(config.backend_name)  # its class attributes say what interface it needs
            ext = await self._external_interface(nl, manager, config, backend_cls)
            udp_flags = UdpFlags(
                opts.udp_source_check, opts.udp_offload, opts.udp_priority, opts.udp_busy_poll, opts.udp_workers
            )
            backend = make_backend(config, nl, ext, udp_flags)
            rules = None
            try:
                network = await backend.register_network(manager)
                self.state.network = network
                self.state.lease_expiration = network.lease.expiration
                rules = self._traffic_rules(config, network.lease, old_env, previous)
                await self._publish(config, network, rules)
            except Exception:  # a failure, not a signal: a signal is a clean stop and keeps what a stop keeps
                if await self._undo_start(manager, network, rules):
                    network = None
                raise
            await manager.complete_lease(network.lease)

            self._starting = None  # from here on a signal ends the serving loop, not the task
            await self._serve(manager, network, rules, nl)
            log.info("Exiting cleanly...")
            return 0
        except STARTUP_ERRORS as e:
            raise StartupError(str(e)) from None
        finally:
            if network is not None:
                await network.close()
            if manager is not None:
                await manager.close()
            if health is not None:
                await health.stop()
            nl.close()

    async def _external_interface(
        self, nl: netlink.Netlink, manager: SubnetManager, config: NetworkConfig, backend_cls: type[Backend]
    ) -> iface.ExternalInterface:
        """The interface for inter-node traffic (with its IPv6 side where the backend carries IPv6), logged."""
        opts = self.opts
        # Addresses an administrator set in the store (Kubernetes: node-public-ip(v6)) replace -public-ip(v6).
        stored, stored6 = manager.stored_public_ips()
        public_ip, public_ipv6 = stored or opts.public_ip, stored6 or opts.public_ipv6
        # For udp an IPv6 underlay is optional: IPv6 pod traffic may cross the IPv4 one.
        dual_stack = config.enable_ipv6 and backend_cls.dual_stack
        ext = await choose_interface(
            nl, opts, public_ip, public_ipv6, dual_stack, backend_cls.ipv6_underlay_optional, config.enable_ipv4
        )
        log.info("Using interface %s with %s, MTU %d", ext.name, ext.describe(), ext.mtu)
        return ext

    def _traffic_rules(self, config: NetworkConfig, lease, old_env: dict, previous) -> TrafficRules:
        opts = self.opts
        return TrafficRules(
            rule_families(config, lease, old_env, previous),
            masq=opts.ip_masq,
            forward=opts.iptables_forward_rules,
            nftables=config.enable_nftables,
            fully_random_disabled=opts.ip_masq_fully_random_disable,
        )

    async def _publish(self, config: NetworkConfig, network, rules: TrafficRules) -> None:
        """Rules in place, then subnet.env for the CNI plugin: from here on the node is ready."""
        opts = self.opts
        await asyncio.to_thread(rules.setup)
        try:
            subnetenv.write_atomically(
                opts.subnet_file, subnetenv.render(config, network.lease, network.mtu, opts.ip_masq)
            )
        except OSError as e:
            raise StartupError(f"cannot write the subnet file {opts.subnet_file}: {e.strerror}") from None
        self.state.ready = True
        subnets = ", ".join(str(s) for s in (network.lease.subnet, network.lease.ipv6_subnet) if s is not None)
        log.info("Wrote subnet file %s (subnet %s); ready", opts.subnet_file, subnets)

    async def _undo_start(self, manager, network, rules: TrafficRules | None) -> bool:
        """A start that failed after allocating a new lease leaves nothing behind: the lease is released, the rules
        and devices it set up are removed. A reused lease (a restart) keeps everything, as a stop would: that state is
        the earlier run's, and its pods may still use it. True if the network was undone (and closed)."""
        try:
            released = await manager.release_created_lease()
        except StoreError as e:
            log.error("Cannot release the lease this start allocated (%s); it expires with its TTL", e)
            released = None
        if released is None:
            return False
        if rules is not None:
            await asyncio.to_thread(rules.undo)
        if network is not None:
            await network.undo()
        log.info("Start-up failed: released lease %s and removed the rules and devices this start set up", released.key)
        return True

    def _on_signal(self, sig: int) -> None:
        log.info("Received %s, shutting down", signal.Signals(sig).name)
        # A second signal kills at once, as upstream: hand the signal back to the default action.
        loop = asyncio.get_running_loop()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(s)
            signal.signal(s, signal.SIG_DFL)
        self.stopping.set()
        if self._starting is not None:
            self._starting.cancel()

    async def _serve(self, manager: SubnetManager, network, rules: TrafficRules, nl: netlink.Netlink) -> None:
        """The node's life after start-up. A fault no task handles ends it as a stop does (the lease and the kernel
        state stay), in one line and exit status 1, never in a traceback of the task group."""
        try:
            await self._serve_tasks(manager, network, rules, nl)
        except* Exception as group:  # noqa: BLE001 - any fault of a task: the node stops and names it
            causes = "; ".join(f"{type(e).__name__}: {e}" for e in group.exceptions)
            log.error("Stopping on a fault while serving: %s", causes)
            raise ServingError(f"the node stopped on a fault while serving: {causes}") from None

    async def _serve_tasks(self, manager: SubnetManager, network, rules: TrafficRules, nl: netlink.Netlink) -> None:
        async with asyncio.TaskGroup() as tasks:
            watch = tasks.create_task(self._follow_leases(manager, network))
            renew = tasks.create_task(self._renew(manager, network))
            own_subnets = [str(s) for s in (network.lease.subnet, network.lease.ipv6_subnet) if s is not None]
            resync = tasks.create_task(self._resync(rules, nl, own_subnets))
            stop = tasks.create_task(self.stopping.wait())
            background = [resync, tasks.create_task(network.supervise())]
            if self.opts.cni_bridge_repair:
                guard = BridgeGuard(nl, self.opts.cni_data_dir, network.lease, network.mtu)
                background.append(tasks.create_task(guard.run()))
            done, _ = await asyncio.wait({watch, renew, stop}, return_when=asyncio.FIRST_COMPLETED)
            for task in (watch, renew, stop, *background):
                task.cancel()

    async def _resync(self, rules: TrafficRules, nl: netlink.Netlink, own_subnets: list[str]) -> None:
        """Every -iptables-resync seconds (the first time after one period, as upstream): put back missing rules,
        and with -ip-blackhole-route a missing `blackhole <own subnet>`."""
        period = max(self.opts.iptables_resync, 1)
        while True:
            await asyncio.sleep(period)
            try:
                await asyncio.to_thread(rules.resync)
                for own_subnet in own_subnets if self.opts.ip_blackhole_route else []:
                    if await nl.call(netlink.ensure_blackhole, own_subnet):
                        log.info("Added blackhole route %s", own_subnet)
            except (RulesError, OSError, netlink.NetlinkError) as e:
                log.error("Resync of rules and routes failed (trying again): %s", e)

    async def _follow_leases(self, manager: SubnetManager, network) -> None:
        stream = LeaseStream(manager, network.lease)
        while True:
            try:
                async for batch in stream.batches():
                    await network.apply(batch)
            except LeaseRevoked:
                log.warning("Lease has been revoked. Shutting down daemon.")
                return
            except StoreError as e:
                # Forwarding goes on with the last known routes while the store is unusable.
                log.error("Lease watch failed (%s); retrying, forwarding continues with the current routes", e)
                await asyncio.sleep(STORE_RETRY)

    async def _renew(self, manager: SubnetManager, network) -> None:
        margin = self.opts.subnet_lease_renew_margin * 60.0
        lease = network.lease
        while lease.expiration is not None:
            left = lease.expiration - time.time()
            # Renew `margin` before expiry, but never before half the time left (a margin longer than that, e.g. the
            # default hour against a short -lease-ttl, would renew again at once).
            await asyncio.sleep(max(left - margin, left / 2, 0.0))
            try:
                lease = await manager.renew_lease(lease)
                self.state.lease_expiration = lease.expiration
                log.info(
                    "Lease renewed, new expiration: %s",
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.expiration)),
                )
            except StoreError as e:
                log.error("Error renewing lease (trying again in 1 min): %s", e)
                await asyncio.sleep(RENEW_RETRY)
        await asyncio.Event().wait()  # a reservation never needs renewing
