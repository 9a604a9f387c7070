"""The Kubernetes subnet manager (upstream pkg/subnet/kube): the node's subnet is its spec.podCIDR(s), assigned by
kube-controller-manager; the lease is published as annotations on the Node; the peers are the other Nodes.

Differences from the lease-store Manager: nothing is allocated or renewed (expiration None: the renewal loop never
runs), the own lease is not watched for revocation, and `complete_lease` sets the NetworkUnavailable condition.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from lightkube import AsyncClient
from lightkube.resources.core_v1 import Node
from lightkube.types import PatchType

from ..config import NetworkConfig
from ..lease import NO_PUBLIC_IP, Events, IPv4Net, IPv6Net, Lease, LeaseAdded, LeaseAttrs, LeaseRemoved, Snapshot
from ..registry import StoreError, StoreUnavailable
from .annotations import AnnotationPrefixError, Annotations, mac_from_backend_data
from .client import (
    KubeConfigError,
    KubeOptions,
    as_store_error,
    load_config,
    make_client,
    node_annotations,
    node_name,
    resolve_node_name,
)
from .informer import AccessDenied, NodeInformer
from .nodes import KUBE_FAILURES, NodeInfo, list_nodes

log = logging.getLogger(__name__)

NODE_WAIT = 30.0  # upstream: the own node must show up (with its podCIDR) within 30 s, polled every 3 s
NODE_POLL = 3.0
PATCH_RETRY = 3.0  # upstream retries the annotation patch every 3 s for up to 30 s
PATCH_WAIT = 30.0
SYNC_TIMEOUT = 600.0  # upstream's nodeControllerSyncTimeout: the first list must succeed within 10 min
# Upstream forces every other backend's lease to IPv4 only; "udp" is ours (the backend type of a dual-stack udp lease).
DUAL_STACK_TYPES = ("vxlan", "host-gw", "wireguard", "udp")
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")


class LeaseConversionError(ValueError):
    pass


def contains_cidr(outer: IPv4Net | IPv6Net, inner: IPv4Net | IPv6Net) -> bool:
    """upstream containsCIDR: the outer prefix is no longer than the inner one and holds its first address."""
    return outer.version == inner.version and outer.prefixlen <= inner.prefixlen and inner.network_address in outer


# Text to address objects, cached: every node converts every peer's Node, and again at each snapshot and re-list.
@functools.lru_cache(maxsize=4096)
def _network(text: str) -> IPv4Net | IPv6Net:
    return ipaddress.ip_network(text, strict=False)


@functools.lru_cache(maxsize=4096)
def _ipv4(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


@functools.lru_cache(maxsize=4096)
def _ipv6(text: str) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(text)


def pod_cidr_text(node: NodeInfo) -> str:
    """The podCIDR fields as the Node spells them, for messages."""
    spec = node.spec
    cidrs: list = (spec.podCIDRs or [spec.podCIDR]) if spec is not None else []
    return ", ".join(str(c) for c in cidrs if c) or "none"


def pod_cidrs(node: NodeInfo) -> tuple[IPv4Net | None, IPv6Net | None]:
    """The node's IPv4 and IPv6 podCIDRs: spec.podCIDR alone, or each of one or two spec.podCIDRs by family."""
    spec = node.spec
    cidrs = list(spec.podCIDRs or []) if spec else []
    if len(cidrs) > 2:
        raise LeaseConversionError(f"node {node_name(node)!r} pod cidrs should be IPv4/IPv6 only or dualstack")
    if not cidrs:
        cidrs = [spec.podCIDR] if spec and spec.podCIDR else []
    v4 = v6 = None
    for text in cidrs:
        try:
            network = _network(text)
        except ValueError:
            raise LeaseConversionError(f"node {node_name(node)!r} has an invalid pod CIDR {text!r}") from None
        if network.version == 4:
            v4 = network
        else:
            v6 = network
    return v4, v6


def _backend_json(text: str | None, name: str) -> Any:
    if text is None or text == "":
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise LeaseConversionError(f"annotation {name} is not JSON: {text[:80]!r}") from None


def node_to_lease(node: NodeInfo, ann: Annotations, enable_ipv4: bool, enable_ipv6: bool) -> Lease:
    """upstream nodeToLease: the peer's lease as its annotations and podCIDRs describe it (in an IPv6-only network the
    IPv6 side alone, PublicIP left at upstream's zero value)."""
    annotations = node_annotations(node)
    v4, v6 = pod_cidrs(node)
    public_ip: ipaddress.IPv4Address | None = None
    public_ipv6 = ipv6_subnet = None
    backend_data = backend_v6_data = None
    if enable_ipv4:
        try:
            public_ip = _ipv4(annotations.get(ann.public_ip, ""))
        except ValueError:
            raise LeaseConversionError(f"invalid {ann.public_ip}: {annotations.get(ann.public_ip)!r}") from None
        backend_data = _backend_json(annotations.get(ann.backend_data), ann.backend_data)
        if v4 is None:
            raise LeaseConversionError("missing IPv4 address on n.Spec.PodCIDRs")
    if enable_ipv6:
        try:
            # A udp node without an IPv6 underlay publishes no public IPv6: its IPv6 pods are reached over IPv4.
            optional = annotations.get(ann.backend_type) == "udp" and not annotations.get(ann.public_ipv6)
            public_ipv6 = None if optional else _ipv6(annotations.get(ann.public_ipv6, ""))
        except ValueError:
            raise LeaseConversionError(f"invalid {ann.public_ipv6}: {annotations.get(ann.public_ipv6)!r}") from None
        backend_v6_data = _backend_json(annotations.get(ann.backend_v6_data), ann.backend_v6_data)
        ipv6_subnet = v6
        if v6 is None:
            raise LeaseConversionError("missing IPv6 address on n.Spec.PodCIDRs")
    if not enable_ipv4 and not enable_ipv6:
        raise LeaseConversionError("the network config enables neither IPv4 nor IPv6")
    if not enable_ipv4 and public_ipv6 is None:
        raise LeaseConversionError(f"invalid {ann.public_ipv6}: {annotations.get(ann.public_ipv6)!r}")
    kind = annotations.get(ann.backend_type, "")
    attrs = LeaseAttrs(public_ip or NO_PUBLIC_IP, public_ipv6, kind, backend_data, backend_v6_data)
    return Lease(v4 if enable_ipv4 else None, attrs, ipv6_subnet, None)


def lease_relevant_change(old: NodeInfo, new: NodeInfo, ann: Annotations, enable_ipv4: bool, enable_ipv6: bool) -> bool:
    """upstream handleUpdateLeaseEvent: an update matters when backend data, type or public IP changed, in either
    family. (Upstream's IPv6 comparison overwrites its IPv4 verdict: in dual stack it misses an IPv4-only change.)"""
    a, b = node_annotations(old), node_annotations(new)
    compared = []
    if enable_ipv4:
        compared += [ann.backend_data, ann.backend_type, ann.public_ip]
    if enable_ipv6:
        compared += [ann.backend_v6_data, ann.backend_type, ann.public_ipv6]
    return not compared or any(a.get(key) != b.get(key) for key in compared)


def _json(value: Any) -> str:
    """Go's json.Marshal of the backend data as the annotation holds it (`null` when there is none)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def wanted_annotations(current: dict[str, str], attrs: LeaseAttrs, ann: Annotations) -> dict[str, str]:
    """The annotations upstream's AcquireLease writes, given the node's current ones (the overwrite annotations win)."""
    out = {ann.backend_type: attrs.backend_type}
    bd, v6bd = _json(attrs.backend_data), _json(attrs.backend_v6_data)
    kind = attrs.backend_type
    if (kind in ("vxlan", "wireguard") and bd != "null") or kind != "vxlan":
        out[ann.backend_data] = bd
        overwrite = current.get(ann.public_ip_overwrite, "")
        if overwrite:
            if current.get(ann.public_ip) != overwrite:
                log.info("Overriding public ip with '%s' from node annotation '%s'", overwrite, ann.public_ip_overwrite)
            out[ann.public_ip] = overwrite
        else:
            out[ann.public_ip] = str(attrs.public_ip)
    if (
        (kind == "vxlan" and v6bd != "null")
        or (kind == "wireguard" and v6bd != "null" and attrs.public_ipv6)
        or (kind in ("host-gw", "udp") and attrs.public_ipv6 is not None)
    ):
        out[ann.backend_v6_data] = v6bd
        overwrite = current.get(ann.public_ipv6_overwrite, "")
        if overwrite:
            if current.get(ann.public_ipv6) != overwrite:
                log.info(
                    "Overriding public ipv6 with '%s' from node annotation '%s'", overwrite, ann.public_ipv6_overwrite
                )
            out[ann.public_ipv6] = overwrite
        else:
            out[ann.public_ipv6] = str(attrs.public_ipv6)
    out[ann.kube_managed] = "true"
    return out


async def list_node_leases(opts: KubeOptions) -> list[tuple[str, Lease]]:
    """(node name, lease) of every node that publishes a flannel lease, for `flannel-udp leases`."""
    try:
        annotations = Annotations.from_prefix(opts.annotation_prefix)
    except AnnotationPrefixError as e:
        raise KubeConfigError(str(e)) from None
    client = make_client(load_config(opts))
    try:
        out = []
        nodes, _version = await list_nodes(client, None)
        for node in nodes:
            if node_annotations(node).get(annotations.kube_managed) != "true":
                continue
            has_ipv6 = bool(node_annotations(node).get(annotations.public_ipv6))
            try:
                has_ipv4 = pod_cidrs(node)[0] is not None  # an IPv6-only cluster's nodes have IPv6 podCIDRs alone
                out.append((node_name(node), node_to_lease(node, annotations, has_ipv4, has_ipv6)))
            except LeaseConversionError as e:
                log.warning("Node %s: %s", node_name(node), e)
        return out
    except KUBE_FAILURES as e:
        raise as_store_error(e, "cannot list the nodes") from None
    finally:
        await client.close()


class KubeManager:
    watches_own_lease = False  # the Node is the lease: there is no expiry to watch for

    def __init__(
        self,
        client: AsyncClient,
        node_name: str,
        config: NetworkConfig,
        annotations: Annotations,
        set_node_network_unavailable: bool = True,
    ) -> None:
        self.client = client
        self.node_name = node_name
        self.config = config
        self.annotations = annotations
        self.set_node_network_unavailable = set_node_network_unavailable
        self.enable_ipv4 = config.enable_ipv4
        self.enable_ipv6 = config.enable_ipv6
        self._queues: set[asyncio.Queue] = set()
        self.informer = NodeInformer(client, node_name, self._on_change, self._on_relist)

    @classmethod
    async def open(cls, opts: KubeOptions, config: NetworkConfig, node_name: str | None = None) -> KubeManager:
        """Connect, find the node name (unless given), and fill the node cache (waiting while the server is out of
        reach)."""
        try:
            annotations = Annotations.from_prefix(opts.annotation_prefix)
        except AnnotationPrefixError as e:
            raise KubeConfigError(f"error creating network manager: {e}") from None
        client = make_client(load_config(opts))
        try:
            node_name = node_name or await resolve_node_name(client)
            manager = cls(client, node_name, config, annotations, opts.set_node_network_unavailable)
            log.info(
                "Kubernetes subnet manager for node %s; waiting up to %.0f s for the node list", node_name, SYNC_TIMEOUT
            )
            try:
                async with asyncio.timeout(SYNC_TIMEOUT):
                    await manager.informer.start()
            except TimeoutError:
                raise StoreError(
                    "error waiting for nodeController to sync state: the node list did not arrive "
                    f"within {SYNC_TIMEOUT:.0f} s"
                ) from None
            except AccessDenied as e:
                raise StoreError(f"error waiting for nodeController to sync state: {e}") from None
            log.info("Node controller sync successful (%d nodes)", len(manager.informer.nodes))
            return manager
        except BaseException:
            await client.close()
            raise

    # -- what the daemon and the backends ask ---------------------------------------------------------------------
    def own_node(self) -> NodeInfo | None:
        return self.informer.nodes.get(self.node_name)

    def stored_public_ips(self) -> tuple[str, str]:
        """node-public-ip / node-public-ipv6 set by the admin: they replace -public-ip / -public-ipv6."""
        node = self.own_node()
        annotations = node_annotations(node) if node else {}
        return (
            annotations.get(self.annotations.node_public_ip, ""),
            annotations.get(self.annotations.node_public_ipv6, ""),
        )

    def stored_mac_addresses(self) -> tuple[str, str]:
        """The VTEP MACs of a previous run, from the backend-data annotations, so that a recreated vxlan device keeps
        the MAC that peers' FDB entries point at."""
        node = self.own_node()
        annotations = node_annotations(node) if node else {}
        key4, key6 = self.annotations.stored_mac_keys
        mac4, mac6 = (mac_from_backend_data(annotations.get(key)) for key in (key4, key6))
        return (mac4 if _MAC_RE.fullmatch(mac4) else "", mac6 if _MAC_RE.fullmatch(mac6) else "")

    async def acquire_lease(self, attrs: LeaseAttrs) -> Lease:
        """The lease from the own Node's podCIDR(s), checked against the config before anything is written (upstream
        annotates first; a node refused here must not look like a peer to the others), then the annotations."""
        node = await self._wait_for_own_node()
        try:
            v4, v6 = pod_cidrs(node)
        except LeaseConversionError as e:
            raise StoreError(str(e)) from None
        subnet = self._checked_ipv4(node, v4) if self.enable_ipv4 else None
        ipv6_subnet = None
        if not self.enable_ipv4 and v6 is None:
            raise StoreError(
                f'node "{self.node_name}" has no IPv6 podCIDR ({pod_cidr_text(node)}) but the network is IPv6-only '
                "(EnableIPv4 false): give kube-controller-manager an IPv6 cluster CIDR"
            )
        if v6 is not None and self.enable_ipv6 and (attrs.backend_type in DUAL_STACK_TYPES or subnet is None):
            if self.config.ipv6_network is None:
                raise StoreError(
                    f'subnet "{v6}" specified in the PodCIDR, but doesn\'t exist in the flannel net '
                    f'config of the "{self.node_name}" node'
                )
            if not contains_cidr(self.config.ipv6_network, v6):
                raise StoreError(
                    f'subnet "{self.config.ipv6_network}" specified in the flannel net config doesn\'t '
                    f'contain "{v6}" IPv6 PodCIDR of the "{self.node_name}" node'
                )
            ipv6_subnet = v6
        elif self.enable_ipv6 and attrs.backend_type in DUAL_STACK_TYPES:
            raise StoreError(
                f'node "{self.node_name}" has no IPv6 podCIDR but EnableIPv6 is set: give '
                "kube-controller-manager an IPv6 cluster CIDR too (dual stack)"
            )
        current = node_annotations(node)
        wanted = wanted_annotations(current, attrs, self.annotations)
        changed = {key: value for key, value in wanted.items() if current.get(key) != value}
        if changed:
            await self._patch_status({"metadata": {"annotations": changed}}, "annotations")
            log.info("Annotated node %s: %s", self.node_name, ", ".join(sorted(changed)))
        cidrs = ", ".join(str(c) for c in (subnet, ipv6_subnet) if c is not None)
        log.info("Lease from node %s: podCIDR %s", self.node_name, cidrs)
        return Lease(subnet, attrs, ipv6_subnet, None)

    def _checked_ipv4(self, node: NodeInfo, v4: IPv4Net | None) -> IPv4Net:
        if v4 is None:
            raise StoreError(
                f'node "{self.node_name}" has no IPv4 podCIDR ({pod_cidr_text(node)}) but EnableIPv4 is set: for an '
                'IPv6-only cluster set "EnableIPv4": false in net-conf.json'
            )
        if self.config.network is None or not contains_cidr(self.config.network, v4):
            raise StoreError(
                f'subnet "{self.config.network}" specified in the flannel net config doesn\'t '
                f'contain "{v4}" PodCIDR of the "{self.node_name}" node'
            )
        return v4

    async def renew_lease(self, lease: Lease) -> Lease:
        return lease  # never asked: a kube lease has no expiration

    async def release_created_lease(self) -> None:
        """Nothing to give back after a failed start: the podCIDR is Kubernetes' allocation, not ours."""
        return None

    async def complete_lease(self, lease: Lease) -> None:
        """NetworkUnavailable=False (reason FlannelIsUp) on the node, unless -set-node-network-unavailable=false."""
        if not self.set_node_network_unavailable:
            return
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        condition = {
            "type": "NetworkUnavailable",
            "status": "False",
            "reason": "FlannelIsUp",
            "message": "Flannel is running on this node",
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }
        try:
            await self._patch_status({"status": {"conditions": [condition]}}, "the NetworkUnavailable condition")
        except StoreError as e:
            log.error("CompleteLease execute error err: %s", e)  # logged, not fatal, as upstream

    async def watch_leases(self) -> AsyncIterator[Snapshot | Events]:
        """The annotated nodes now, then their changes; a new Snapshot after the informer had to list again."""
        queue: asyncio.Queue = asyncio.Queue()
        self._queues.add(queue)
        try:
            yield Snapshot([lease for _name, lease in self._cached_leases()], 0)
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                if any(isinstance(item, Snapshot) for item in items):
                    # Every queued item is already in the cache: one fresh Snapshot stands for all of them.
                    yield Snapshot([lease for _name, lease in self._cached_leases()], 0)
                else:
                    yield Events([event for item in items for event in item.events])
        finally:
            self._queues.discard(queue)

    async def close(self) -> None:
        await self.informer.close()
        await self.client.close()

    # -- internals ------------------------------------------------------------------------------------------------
    def _managed(self, node: NodeInfo | None) -> bool:
        return node is not None and node_annotations(node).get(self.annotations.kube_managed) == "true"

    def _to_lease(self, node: NodeInfo) -> Lease | None:
        try:
            return node_to_lease(node, self.annotations, self.enable_ipv4, self.enable_ipv6)
        except LeaseConversionError as e:
            log.info("Error turning node %r to lease: %s", node_name(node), e)
            return None

    def _cached_leases(self) -> list[tuple[str, Lease]]:
        out = []
        for name, node in self.informer.nodes.items():
            if self._managed(node):
                lease = self._to_lease(node)
                if lease is not None:
                    out.append((name, lease))
        return out

    def _publish(self, item: Snapshot | Events) -> None:
        for queue in self._queues:
            queue.put_nowait(item)

    def _on_change(self, old: NodeInfo | None, new: NodeInfo | None) -> None:
        if new is None:  # deleted
            if old is not None and self._managed(old):
                lease = self._to_lease(old)
                if lease is not None:
                    self._publish(Events([LeaseRemoved(lease.subnet, lease.ipv6_subnet)]))
            return
        if not self._managed(new):
            return
        if old is not None and not lease_relevant_change(
            old, new, self.annotations, self.enable_ipv4, self.enable_ipv6
        ):
            return
        lease = self._to_lease(new)
        if lease is not None:
            self._publish(Events([LeaseAdded(lease)]))

    def _on_relist(self) -> None:
        self._publish(Snapshot([lease for _name, lease in self._cached_leases()], 0))

    async def _wait_for_own_node(self) -> NodeInfo:
        """The own node with a podCIDR, from the cache; waited for up to 30 s as upstream (which polls every 3 s;
        here every cache change is looked at as it comes)."""
        deadline = time.monotonic() + NODE_WAIT
        said = False
        while True:
            node = self.own_node()
            if node is not None and node.spec and (node.spec.podCIDR or node.spec.podCIDRs):
                return node
            left = deadline - time.monotonic()
            if left <= 0:
                if node is None:
                    raise StoreError(
                        f'timeout contacting kube-api, failed to patch node "{self.node_name}". Error: '
                        f'node "{self.node_name}" does not exist'
                    )
                raise StoreError(f'node "{self.node_name}" pod cidr not assigned')
            if not said:
                log.info(
                    "Waiting up to %.0f s for node %s %s",
                    NODE_WAIT,
                    self.node_name,
                    "to be registered" if node is None else "to get its podCIDR",
                )
                said = True
            self.informer.changed.clear()
            try:
                async with asyncio.timeout(min(left, NODE_POLL)):
                    await self.informer.changed.wait()
            except TimeoutError:
                pass

    async def _patch_status(self, patch: dict, what: str) -> None:
        """A strategic-merge patch on nodes/status (the only write upstream's role grants), retried every 3 s for up to
        30 s while the server is out of reach; a refusal ends at once."""
        deadline = time.monotonic() + PATCH_WAIT
        while True:
            try:
                await self.client.patch(Node.Status, self.node_name, patch, patch_type=PatchType.STRATEGIC)
                return
            except KUBE_FAILURES as e:
                error = as_store_error(e, f"failed to patch {what} of node {self.node_name!r}")
                if not isinstance(error, StoreUnavailable) or time.monotonic() + PATCH_RETRY > deadline:
                    raise error from None
                log.warning("%s; trying again in %.0f s", error, PATCH_RETRY)
                await asyncio.sleep(PATCH_RETRY)
