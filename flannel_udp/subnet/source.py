"""Where leases come from, as plain values: etcd, the Kubernetes API or the embedded lease file. The command line
builds a LeaseSource from its flags for the tools (`leases`, `capture`); the daemon opens its registry the same way."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .lease import Lease
from .registry import Registry, StoreError

if TYPE_CHECKING:
    from .etcd.client import EtcdOptions
    from .kube.client import KubeOptions


class NoLeaseFile(StoreError):
    pass


@dataclass(frozen=True)
class LeaseSource:
    lease_file: str
    etcd: EtcdOptions | None = None  # etcd instead of the lease file
    kube: KubeOptions | None = None  # the Nodes of the Kubernetes API instead of either

    def open_registry(self, create: bool = False) -> Registry:
        """The registry of leases: etcd when given (gRPC is loaded only then), else the embedded file, which only the
        node agent creates (create=True): a tool that reads leases must not leave an empty store behind."""
        if self.etcd is not None:
            from .etcd.registry import EtcdRegistry

            return EtcdRegistry(self.etcd)
        from .local.registry import LocalRegistry

        if not create and not os.path.exists(self.lease_file):
            raise NoLeaseFile(f"no lease file at {self.lease_file} (give -etcd-endpoints to read leases from etcd)")
        return LocalRegistry.open_sync(self.lease_file)

    async def read(self) -> list[tuple[str, Lease]]:
        """(node name, lease) for every lease; the node name is "" outside kube mode."""
        if self.kube is not None:
            from .kube.manager import list_node_leases

            return await list_node_leases(self.kube)
        registry = self.open_registry()
        try:
            return [("", lease) for lease in (await registry.get_subnets())[0]]
        finally:
            await registry.close()
