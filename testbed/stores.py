"""Writing to a lease store beside the node agent's API: what tests plant that the agent never writes itself (values
in upstream's own bytes, hostile keys and values, reservations as `etcdctl put` makes them), and etcd's revision."""

from __future__ import annotations

import posixpath
import time


async def put_raw(registry, key: str, value: str, ttl: float | None) -> None:
    """Write `value` under the subnet key `key` as given; ttl None: no expiry (a reservation)."""
    from flannel_udp.subnet.etcd.registry import EtcdRegistry

    if isinstance(registry, EtcdRegistry):
        lease = None if ttl is None else await registry._grant(ttl)
        path = posixpath.join(registry.subnets_key, key).encode()
        await registry._call(registry.client.put, path, value.encode(), lease=lease)
    else:
        await registry._run(registry._put, key, value, None if ttl is None else time.time() + ttl)


async def etcd_revision(registry) -> int:
    """The etcd store's current revision."""
    return (await registry._call(registry.client.get_prefix, registry.subnets_key.encode())).header.revision
