"""Turns store results (snapshots and events) into batches of added/removed leases for a backend (upstream LeaseWatcher).

Two upstream quirks are fixed: the own lease is never reported (upstream emits Removed for it on a second snapshot), and a
lease whose attributes changed between two snapshots is reported again as Added (upstream stays silent, so a peer that
changed its public IP would keep a stale route until restart).
"""
from __future__ import annotations

from .lease import EventType, Events, IPv4Net, Lease, LeaseEvent, Snapshot


class LeaseWatcher:
    def __init__(self, own_subnet: IPv4Net) -> None:
        self.own_subnet = own_subnet
        self.leases: dict[IPv4Net, Lease] = {}

    def apply(self, result: Snapshot | Events) -> list[LeaseEvent]:
        if isinstance(result, Snapshot):
            return self.reset(result.leases)
        return self.update(result.events)

    def reset(self, leases: list[Lease]) -> list[LeaseEvent]:
        fresh = {lease.subnet: lease for lease in leases if lease.subnet != self.own_subnet}
        batch = [LeaseEvent(EventType.REMOVED, old) for subnet, old in self.leases.items() if subnet not in fresh]
        for subnet, lease in fresh.items():
            old = self.leases.get(subnet)
            if old is None or old.attrs != lease.attrs or old.ipv6_subnet != lease.ipv6_subnet:
                batch.append(LeaseEvent(EventType.ADDED, lease))
        self.leases = fresh
        return batch

    def update(self, events: list[LeaseEvent]) -> list[LeaseEvent]:
        batch = []
        for event in events:
            subnet = event.lease.subnet
            if subnet == self.own_subnet:
                continue
            if event.type is EventType.ADDED:
                self.leases[subnet] = event.lease
                batch.append(event)
            else:
                # A removal from the store carries no attrs: report the stored lease so the backend knows the peer.
                known = self.leases.pop(subnet, None)
                batch.append(LeaseEvent(EventType.REMOVED, known or event.lease))
        return batch
