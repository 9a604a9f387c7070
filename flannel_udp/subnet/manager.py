"""The subnet manager's interface (upstream's subnet.Manager), and the Manager that implements it on top of any Registry
(embedded file or etcd); the Kubernetes subnet manager (kube/manager.py) implements it on the Nodes."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import AsyncIterator
from typing import Protocol

from ..defaults import LEASE_TTL
from . import subnetenv
from .allocation import Decision, decide
from .config import NetworkConfig
from .lease import Events, IPv4Net, IPv6Net, Lease, LeaseAttrs, Snapshot, make_subnet_key
from .registry import Registry, StoreUnavailable, SubnetExists

log = logging.getLogger(__name__)

RACE_RETRIES = 10
STORE_RETRY = 1.0
RACE_BACKOFF = 0.05  # seconds, times the attempt number: the upper bound of the pause after a lost race
DEFAULT_LEASE_TTL = float(LEASE_TTL)


class AcquireError(RuntimeError):
    pass


class SubnetManager(Protocol):
    """Where a node's lease and its peers' come from: all the daemon and the backends ask of a store."""

    watches_own_lease: bool  # whether the own lease vanishing from the watch means it was revoked

    async def acquire_lease(self, attrs: LeaseAttrs) -> Lease: ...

    async def renew_lease(self, lease: Lease) -> Lease: ...

    async def complete_lease(self, lease: Lease) -> None:
        """After start-up (the Kubernetes manager sets the Node's NetworkUnavailable condition)."""

    async def release_created_lease(self) -> Lease | None:
        """After a failed start: give back a lease this start allocated; what was released, if anything."""

    def watch_leases(self) -> AsyncIterator[Snapshot | Events]: ...

    def stored_public_ips(self) -> tuple[str, str]:
        """Public IPv4 and IPv6 addresses an administrator set for this node in the store ("" for none)."""

    def stored_mac_addresses(self) -> tuple[str, str]:
        """The VTEP MACs the store remembers for this node, IPv4 then IPv6 ("" for none)."""

    async def close(self) -> None: ...


class Manager:
    watches_own_lease = True  # a lease deleted from the store (or expired) stops the node, as upstream

    def __init__(
        self,
        registry: Registry,
        config: NetworkConfig,
        previous: tuple[IPv4Net | None, IPv6Net | None] = (None, None),
        lease_ttl: float = DEFAULT_LEASE_TTL,
        rng: random.Random | None = None,
    ) -> None:
        self.registry = registry
        self.config = config
        self.previous = previous
        self.lease_ttl = lease_ttl
        self.rng = rng or random.Random()
        self.created: Lease | None = None  # a lease this process allocated (not one it found and reused)
        # Keys this process asked the store to create: a create whose answer was lost (a timeout under load) may have
        # succeeded, and the lease found by public IP at the next attempt is then this start's own, not an old one.
        self._tried: set[str] = set()

    async def acquire_lease(self, attrs: LeaseAttrs) -> Lease:
        """Upstream's allocation; an unreachable store (etcd down) is waited for, once a second, saying so once."""
        waiting = False
        while True:
            try:
                lease = await self._try_acquire(attrs)
            except StoreUnavailable as e:
                if not waiting:
                    log.error("Cannot reach the lease store (%s); trying again every %.0f s", e, STORE_RETRY)
                    waiting = True
                await asyncio.sleep(STORE_RETRY)
                continue
            if waiting:
                log.info("The lease store is reachable again")
            return lease

    async def _try_acquire(self, attrs: LeaseAttrs) -> Lease:
        """Upstream's tryAcquireLease, except that a create that loses a race is retried (upstream gives up at once)."""
        for attempt in range(RACE_RETRIES):
            leases, _rev = await self.registry.get_subnets(expirations=False)  # a reservation is told apart anyway
            decision = decide(self.config, leases, node_address(self.config, attrs), self.previous, self.rng)
            for stale in decision.delete:
                log.warning(
                    "Found lease (%s) for current IP (%s) but not compatible with current config, deleting",
                    stale.key,
                    node_address(self.config, attrs),
                )
                await self.registry.delete_subnet(stale.subnet, stale.ipv6_subnet)
            if decision.reuse is not None:
                # A reservation (no expiry) stays one; upstream re-attaches a TTL to it (flannel issue #1329).
                ttl = None if decision.reuse.expiration is None else self.lease_ttl
                expiration = await self.registry.update_subnet(decision.subnet, decision.ipv6_subnet, attrs, ttl)
                log.info(
                    "Found lease (%s) for current IP (%s), reusing",
                    decision.reuse.key,
                    node_address(self.config, attrs),
                )
            else:
                self._tried.add(make_subnet_key(decision.subnet, decision.ipv6_subnet))
                try:
                    expiration = await self.registry.create_subnet(
                        decision.subnet, decision.ipv6_subnet, attrs, self.lease_ttl
                    )
                    dual = decision.subnet is not None and decision.ipv6_subnet is not None
                    if dual and await self._shares_a_subnet(decision):
                        # A dual-stack key names both subnets, so the store's create-if-absent cannot see another node
                        # that took the same IPv4 (or IPv6) subnet with a different partner at the same moment.
                        await self.registry.delete_subnet(decision.subnet, decision.ipv6_subnet)
                        raise SubnetExists(f"{decision.subnet} or {decision.ipv6_subnet} is in another lease too")
                except SubnetExists:
                    log.info(
                        "Subnet %s was taken by another node meanwhile, trying again",
                        decision.subnet or decision.ipv6_subnet,
                    )
                    # A short random pause spreads a crowd of nodes starting together, so that the next listing
                    # already shows what the winners took.
                    await asyncio.sleep(self.rng.uniform(0, RACE_BACKOFF * (attempt + 1)))
                    continue
                log.info(
                    "Allocated lease (%s) to current node (%s)",
                    ", ".join(str(s) for s in (decision.subnet, decision.ipv6_subnet) if s is not None),
                    node_address(self.config, attrs),
                )
            lease = Lease(decision.subnet, attrs, decision.ipv6_subnet, expiration)
            found_old = decision.reuse is not None and decision.reuse.key not in self._tried
            self.created = None if found_old else lease
            return lease
        raise AcquireError(
            f"failed to acquire lease: max retries reached trying to acquire a subnet ({RACE_RETRIES} lost races)"
        )

    async def _shares_a_subnet(self, decision: Decision) -> bool:
        leases, _ = await self.registry.get_subnets(expirations=False)
        return any(
            (lease.subnet == decision.subnet or lease.ipv6_subnet == decision.ipv6_subnet)
            and (lease.subnet, lease.ipv6_subnet) != (decision.subnet, decision.ipv6_subnet)
            for lease in leases
        )

    async def renew_lease(self, lease: Lease) -> Lease:
        ttl = None if lease.expiration is None else self.lease_ttl
        expiration = await self.registry.update_subnet(lease.subnet, lease.ipv6_subnet, lease.attrs, ttl)
        return Lease(lease.subnet, lease.attrs, lease.ipv6_subnet, expiration)

    async def complete_lease(self, lease: Lease) -> None:
        """Nothing to do after start-up for a lease store (the Kubernetes manager sets a node condition here)."""

    def stored_public_ips(self) -> tuple[str, str]:
        """A lease store has no administrator's addresses for a node (Kubernetes has them as Node annotations)."""
        return "", ""

    def stored_mac_addresses(self) -> tuple[str, str]:
        """A lease store keeps no VTEP MACs apart from the devices themselves, which are reused as they are."""
        return "", ""

    async def release_created_lease(self) -> Lease | None:
        """After a failed start: give back the lease this process allocated, so that a node that never ran leaves
        no 24 h lease behind (a reused lease stays: it is the node's from an earlier run). Returns what it released."""
        lease, self.created = self.created, None
        if lease is not None:
            await self.registry.delete_subnet(lease.subnet, lease.ipv6_subnet)
        return lease

    def watch_leases(self) -> AsyncIterator[Snapshot | Events]:
        return self.registry.watch_subnets()

    async def close(self) -> None:
        await self.registry.close()


def node_address(config: NetworkConfig, attrs: LeaseAttrs) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """What identifies a node's lease in the store: its PublicIP, or in an IPv6-only network its PublicIPv6."""
    if config.enable_ipv4 or attrs.public_ipv6 is None:
        return attrs.public_ip
    return attrs.public_ipv6


def previous_subnet_from(values: dict[str, list]) -> tuple[IPv4Net | None, IPv6Net | None]:
    """FLANNEL_SUBNET / FLANNEL_IPV6_SUBNET from an old subnet.env (subnetenv.read), masked to the subnet, as upstream
    reads them."""
    v4, v6 = subnetenv.single(values, "FLANNEL_SUBNET"), subnetenv.single(values, "FLANNEL_IPV6_SUBNET")
    return (
        v4 if isinstance(v4, ipaddress.IPv4Network) else None,
        v6 if isinstance(v6, ipaddress.IPv6Network) else None,
    )
