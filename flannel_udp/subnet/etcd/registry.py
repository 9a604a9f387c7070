"""The etcd lease store, byte-compatible with upstream flanneld (pkg/subnet/etcd/registry.go): a mixed cluster shares
one prefix.

Keys `<prefix>/subnets/10.244.1.0-24` hold upstream's lease JSON, each attached to an etcd lease of the lease TTL and
created with a create-if-absent transaction. A key with no etcd lease is a reservation and stays one (upstream
re-attaches a TTL to it, flannel#1329). The watch is a snapshot, then a prefix watch from its revision + 1; a broken
stream is resumed from the last revision seen, and a watch that fell behind compaction re-lists.
"""

from __future__ import annotations

import asyncio
import logging
import math
import posixpath
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
from aetcd import exceptions as etcd_errors
from aetcd import rpc

from ..lease import (
    Events,
    IPv4Net,
    IPv6Net,
    Lease,
    LeaseAdded,
    LeaseAttrs,
    LeaseEvent,
    LeaseRemoved,
    Snapshot,
    decode_or_warn,
    make_subnet_key,
    parse_subnet_key,
)
from ..registry import Registry, StoreError, StoreUnavailable, SubnetExists
from .client import EtcdClient, EtcdOptions

log = logging.getLogger(__name__)

WATCH_BACKOFF_FIRST = 0.1
WATCH_BACKOFF_MAX = 5.0
CONFIG_NOT_FOUND = "flannel config not found in etcd store. Did you create your config using etcdv3 API?"
# A removal event carries only the subnets of its key; the LeaseWatcher adds an IPv6 subnet it had seen with the lease.


class ConfigNotFound(StoreError):
    def __init__(self) -> None:
        super().__init__(CONFIG_NOT_FOUND)


def _translate(e: etcd_errors.ClientError, endpoints: str) -> StoreError:
    if isinstance(e, (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError)):
        return StoreUnavailable(f"etcd at {endpoints} is unreachable: {e}")
    if isinstance(e, etcd_errors.UnauthenticatedError):
        return StoreError(f"etcd at {endpoints} refused the credentials: {e}")
    return StoreError(f"etcd at {endpoints}: {e or type(e).__name__}")


class EtcdRegistry(Registry):
    def __init__(self, opts: EtcdOptions, client: EtcdClient | None = None) -> None:
        self.client = client or EtcdClient(opts)
        prefix = posixpath.normpath("/" + opts.prefix.strip("/")) if opts.prefix.strip("/") else "/"
        # Go's path.Join, as upstream builds its keys.
        self.config_key = posixpath.join(prefix, "config")
        self.subnets_key = posixpath.join(prefix, "subnets")

    def subnet_key(self, subnet: IPv4Net | None, ipv6_subnet: IPv6Net | None) -> bytes:
        return posixpath.join(self.subnets_key, make_subnet_key(subnet, ipv6_subnet)).encode()

    async def _call(self, method, *args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except etcd_errors.RevisionCompactedError:
            raise  # the watch handles it by re-listing
        except etcd_errors.ClientError as e:
            raise _translate(e, self.client.description) from None

    # -- config ------------------------------------------------------------------------------------------------------
    async def get_network_config(self) -> bytes:
        result = await self._call(self.client.get, self.config_key.encode())
        if result is None:
            raise ConfigNotFound()
        return result.value

    async def put_network_config(self, text: str | bytes) -> None:
        await self._call(self.client.put, self.config_key.encode(), text.encode() if isinstance(text, str) else text)

    # -- leases ------------------------------------------------------------------------------------------------------
    async def _expiration(self, lease_id: int) -> float | None:
        """None for a key without an etcd lease (a reservation); else now + the lease's remaining TTL."""
        if lease_id == 0:
            return None
        info = await self._call(self.client.get_lease_info, lease_id, keys=False)
        # TTL -1: the lease is already gone, and its key with it a moment later.
        return time.time() + max(info.TTL, 0)

    @staticmethod
    def _decode(kv: Any, when: float | None) -> Lease | None:
        event = decode_or_warn(kv.key.decode("utf-8", "replace"), kv.value, when)
        return event.lease if isinstance(event, LeaseAdded) else None

    @staticmethod
    def _unasked_expiration(kv: Any) -> float | None:
        """None for a reservation; inf for a key with an etcd lease, whose TTL was not asked."""
        return None if kv.lease == 0 else math.inf

    async def get_subnets(self, expirations: bool = True) -> tuple[list[Lease], int]:
        """Every lease and the revision. Without `expirations` no TTL is asked per key (upstream asks one RPC per
        lease at every listing, also for an allocation, which only needs to tell a reservation from a lease; at 1,000
        nodes that is 10^6 RPCs across the cluster at every start): a key with an etcd lease carries expiration inf,
        a reservation None."""
        # No trailing slash on the prefix, as upstream; keys that do not parse are skipped.
        result = await self._call(self.client.list_prefix, self.subnets_key.encode())
        if expirations:
            whens = await asyncio.gather(*(self._expiration(kv.lease) for kv in result.kvs))
        else:
            whens = [self._unasked_expiration(kv) for kv in result.kvs]
        leases = [self._decode(kv, when) for kv, when in zip(result.kvs, whens, strict=True)]
        return [lease for lease in leases if lease is not None], result.header.revision

    async def _grant(self, ttl: float) -> Any:
        return await self._call(self.client.lease, max(1, round(ttl)))

    async def create_subnet(
        self, subnet: IPv4Net | None, ipv6_subnet: IPv6Net | None, attrs: LeaseAttrs, ttl: float
    ) -> float:
        key = self.subnet_key(subnet, ipv6_subnet)
        grant = await self._grant(ttl)
        tx = self.client.transactions
        created, _ = await self._call(
            self.client.transaction,
            compare=[tx.create(key) == 0],
            success=[tx.put(key, attrs.to_json().encode(), lease=grant)],
            failure=[],
        )
        if not created:
            await self._call(self.client.revoke_lease, grant.id)
            raise SubnetExists(f"subnet {subnet} already exists")
        return time.time() + grant.ttl

    async def update_subnet(
        self, subnet: IPv4Net | None, ipv6_subnet: IPv6Net | None, attrs: LeaseAttrs, ttl: float | None
    ) -> float | None:
        key = self.subnet_key(subnet, ipv6_subnet)
        if ttl is None:
            await self._call(self.client.put, key, attrs.to_json().encode())
            return None
        # A fresh etcd lease each time, as upstream; the old one expires on its own.
        grant = await self._grant(ttl)
        await self._call(self.client.put, key, attrs.to_json().encode(), lease=grant)
        return time.time() + grant.ttl

    async def delete_subnet(self, subnet: IPv4Net | None, ipv6_subnet: IPv6Net | None) -> None:
        await self._call(self.client.delete, self.subnet_key(subnet, ipv6_subnet))

    # -- watch -------------------------------------------------------------------------------------------------------
    def _event(self, event: Any) -> LeaseEvent | None:
        if event.type == rpc.Event.DELETE:  # a delete, or the expiry of the key's etcd lease
            subnets = parse_subnet_key(event.kv.key.decode("utf-8", "replace"))
            return None if subnets is None else LeaseRemoved(*subnets)
        lease = self._decode(event.kv, self._unasked_expiration(event.kv))
        return None if lease is None else LeaseAdded(lease)

    async def watch_subnets(self, since: int | None = None) -> AsyncIterator[Snapshot | Events]:
        """Snapshot, then events; survives etcd restarts (resume from the last revision) and compaction (re-list).

        With `since`, events after that revision come first, without a snapshot (unless it was compacted away).
        While etcd is unreachable nothing is yielded, so the node keeps forwarding with the routes it has; the outage
        is logged once, and so is the recovery.
        """
        revision = since
        backoff = WATCH_BACKOFF_FIRST
        outage = False
        while True:
            try:
                if revision is None:
                    leases, revision = await self.get_subnets(expirations=False)
                    yield Snapshot(leases, revision)
                watch = self.client.watch_prefix_batches(self.subnets_key.encode(), revision + 1)
                try:
                    async for batch in watch:  # the first, empty, once the watch exists
                        if outage:
                            log.warning(
                                "etcd at %s is reachable again; following leases from revision %d",
                                self.client.description,
                                revision + 1,
                            )
                            outage = False
                        backoff = WATCH_BACKOFF_FIRST
                        if not batch:
                            continue
                        revision = max(revision, batch[-1].kv.mod_revision)
                        decoded = [self._event(event) for event in batch]
                        events = [event for event in decoded if event is not None]
                        if events:
                            yield Events(events, revision)
                finally:
                    await watch.aclose()
                raise StoreUnavailable("the watch stream closed")
            except etcd_errors.RevisionCompactedError as e:
                log.info("Lease watch fell behind compaction (%s); re-listing", e)
                revision = None
            except (etcd_errors.ClientError, StoreError) as e:
                # Whatever broke the watch (a restart, a dropped stream, a member going away), it must not end: the
                # node keeps its routes and the watch resumes from the last revision once etcd answers again.
                if not outage:
                    log.error("Lost the etcd watch (%s); forwarding goes on with the last known routes, retrying", e)
                    outage = True
                await self.client.wait_until_reachable(backoff)
                backoff = min(backoff * 2, WATCH_BACKOFF_MAX)

    async def close(self) -> None:
        if not await _bounded(self.client.close(), "closing the etcd client"):
            # A channel that is reconnecting can hold aetcd's close: never let that hold a shutdown.
            channel = self.client.channel
            if channel is not None:
                await _bounded(channel.close(), "closing the etcd channel")


CLOSE_TIMEOUT = 2.0


async def _bounded(awaitable: Awaitable[Any], what: str) -> bool:
    """Await a clean-up step for at most CLOSE_TIMEOUT; False if it failed or hung (logged, never raised): a dead
    stream behind aetcd's bounded request queue can make such steps wait forever."""
    try:
        await asyncio.wait_for(awaitable, CLOSE_TIMEOUT)
        return True
    except (TimeoutError, etcd_errors.ClientError, grpc.RpcError, OSError) as e:  # a hung or broken stream's ends
        log.debug("%s: %r", what, e)
        return False
