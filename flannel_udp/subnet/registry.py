"""The storage seam: what a lease store must offer so that one Manager can allocate on top of it (upstream Registry)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from .lease import Events, IPv4Net, IPv6Net, Lease, LeaseAttrs, Snapshot


class SubnetExists(RuntimeError):
    """A create-if-absent lost: the key was taken between listing and creating."""


class StoreError(RuntimeError):
    """The store cannot be used (unreachable, unwritable, corrupt)."""


class StoreUnavailable(StoreError):
    """The store is out of reach for now (etcd down or partitioned): worth retrying, not a reason to stop."""


class Registry(ABC):
    @abstractmethod
    async def get_subnets(self, expirations: bool = True) -> tuple[list[Lease], int]:
        """Every current lease, and the store revision they were read at. Without `expirations` a store may leave
        out what costs extra to learn: a lease that expires then carries expiration inf (when is not known), and a
        reservation None, as always."""

    @abstractmethod
    async def create_subnet(
        self, subnet: IPv4Net | None, ipv6_subnet: IPv6Net | None, attrs: LeaseAttrs, ttl: float
    ) -> float:
        """Create the key only if absent; returns the expiration. Raises SubnetExists."""

    @abstractmethod
    async def update_subnet(
        self, subnet: IPv4Net | None, ipv6_subnet: IPv6Net | None, attrs: LeaseAttrs, ttl: float | None
    ) -> float | None:
        """Write the key; ttl None keeps it without expiry (a reservation). Returns the expiration."""

    @abstractmethod
    async def delete_subnet(self, subnet: IPv4Net | None, ipv6_subnet: IPv6Net | None) -> None: ...

    @abstractmethod
    def watch_subnets(self) -> AsyncIterator[Snapshot | Events]:
        """A Snapshot first, then Events; a fresh Snapshot whenever the watch had to start over."""

    async def close(self) -> None:
        return None
