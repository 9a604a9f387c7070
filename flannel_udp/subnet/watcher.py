"""The lease pipeline a backend follows (upstream's WatchLeases and LeaseWatcher): store results (snapshots and events)
become batches of added and removed peer leases; the own lease's disappearance ends the stream with LeaseRevoked.

Two upstream quirks are fixed: the own lease is never reported (upstream emits Removed for it on a second snapshot),
and a lease whose attributes changed between two snapshots is reported again as Added (upstream stays silent, so a
peer that changed its public IP would keep a stale route until restart).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from .lease import Events, EventType, Lease, LeaseAdded, LeaseEvent, LeaseRemoved, Snapshot, Subnet

if TYPE_CHECKING:
    from .manager import SubnetManager


class LeaseRevoked(Exception):
    """The own lease left the store (deleted or expired): a node without a lease must stop, as upstream."""


class LeaseWatcher:
    """The peers' leases as last seen, by their primary subnet (IPv4, or IPv6 in an IPv6-only network); turns each
    store result into the batch of changes a backend applies."""

    def __init__(self, own_subnet: Subnet) -> None:
        self.own_subnet = own_subnet
        self.leases: dict[Subnet, Lease] = {}

    def apply(self, result: Snapshot | Events) -> list[LeaseEvent]:
        if isinstance(result, Snapshot):
            return self.reset(result.leases)
        return self.update(result.events)

    def reset(self, leases: list[Lease]) -> list[LeaseEvent]:
        fresh = {lease.primary: lease for lease in leases if lease.primary != self.own_subnet}
        batch: list[LeaseEvent] = [
            LeaseRemoved(old.subnet, old.ipv6_subnet) for subnet, old in self.leases.items() if subnet not in fresh
        ]
        for subnet, lease in fresh.items():
            old = self.leases.get(subnet)
            if old is None or old.attrs != lease.attrs or old.ipv6_subnet != lease.ipv6_subnet:
                batch.append(LeaseAdded(lease))
        self.leases = fresh
        return batch

    def update(self, events: list[LeaseEvent]) -> list[LeaseEvent]:
        batch: list[LeaseEvent] = []
        for event in events:
            if event.primary == self.own_subnet:
                continue
            if isinstance(event, LeaseAdded):
                self.leases[event.primary] = event.lease
                batch.append(event)
            else:
                known = self.leases.pop(event.primary, None)
                ipv6_subnet = event.ipv6_subnet or (known.ipv6_subnet if known is not None else None)
                batch.append(LeaseRemoved(event.subnet, ipv6_subnet))
        return batch


def own_lease_gone(result: Snapshot | Events, own: Lease) -> bool:
    if isinstance(result, Snapshot):
        return all(lease.primary != own.primary for lease in result.leases)
    return any(e.type is EventType.REMOVED and e.primary == own.primary for e in result.events)


class LeaseStream:
    """Batches of peer lease changes for the node holding `own`. The peers seen so far survive a broken watch: a new
    call of batches() after a StoreError reports only what changed meanwhile."""

    def __init__(self, manager: SubnetManager, own: Lease) -> None:
        self.manager = manager
        self.own = own
        self.watcher = LeaseWatcher(own.primary)

    async def batches(self) -> AsyncIterator[list[LeaseEvent]]:
        """Raises LeaseRevoked when the store no longer has the own lease (where the store can tell: a Kubernetes
        Node is not revoked that way), StoreError when the store fails."""
        async for result in self.manager.watch_leases():
            if self.manager.watches_own_lease and own_lease_gone(result, self.own):
                raise LeaseRevoked(f"lease {self.own.primary} has been revoked")
            batch = self.watcher.apply(result)
            if batch:
                yield batch
