"""A list+watch cache of the cluster's Node objects (client-go's informer, reduced to what flannel needs).

It lists once, then watches from the list's resourceVersion. A broken stream (the API server restarting or out of
reach) is resumed from the last resourceVersion seen, once a second, while forwarding goes on with what the cache
holds; only a 410 Gone (that version is no longer in the server's history) makes it list again. Each change reaches
`on_change(old, new)` (old None: added; new None: deleted) and each fresh list `on_relist()`, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import httpx2
from lightkube import ApiError, AsyncClient
from lightkube.resources.core_v1 import Node

from .client import describe, is_unavailable, node_name
from .nodes import KUBE_FAILURES, NodeInfo, NodeStreamError, list_nodes, watch_nodes

log = logging.getLogger(__name__)

RETRY = 1.0  # seconds between tries while the API server is out of reach
REFUSAL_GRACE = 5.0  # seconds a refusal (401/403) of the first list may last before it ends the start


class AccessDenied(RuntimeError):
    """The credentials are refused (401/403): waiting will not help."""


class NodeInformer:
    def __init__(
        self,
        client: AsyncClient,
        probe_node: str,
        on_change: Callable[[NodeInfo | None, NodeInfo | None], None],
        on_relist: Callable[[], None],
    ) -> None:
        self.client = client
        self.probe_node = probe_node  # a cheap GET that tells whether the server is back (get nodes is granted)
        self.on_change = on_change
        self.on_relist = on_relist
        self.nodes: dict[str, NodeInfo] = {}
        self.resource_version: str | None = None
        self.changed = asyncio.Event()  # set at every change; waiters clear it
        self.lists = 0
        self._task: asyncio.Task | None = None
        self._outage: str | None = None

    async def start(self) -> None:
        """List (waiting while the server is out of reach), then watch in the background. Refused credentials end
        the start with AccessDenied: no amount of waiting fixes them."""
        await self._retrying(self._list, refusal_is_fatal=True)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass  # what cancel() asked for; a watch that had died of anything else says so below
            except KUBE_FAILURES as e:
                log.error("The node watch had stopped: %s", describe(e))

    async def _retrying(self, step: Callable[[], Awaitable[None]], refusal_is_fatal: bool = False) -> None:
        refused_since = None
        while True:
            try:
                await step()
                self._recovered()
                return
            except KUBE_FAILURES as e:
                if refusal_is_fatal and isinstance(e, ApiError) and e.status.code in (401, 403):
                    # A starting API server refuses for a moment, until its authorizer has loaded the roles;
                    # a refusal that lasts is the credentials' fault.
                    refused_since = refused_since or time.monotonic()
                    if time.monotonic() - refused_since >= REFUSAL_GRACE:
                        raise AccessDenied(describe(e)) from None
                else:
                    refused_since = None
                self._failed(e)
                await asyncio.sleep(RETRY)

    def _failed(self, error: BaseException) -> None:
        """Say once that the server is lost, whatever the wording of each later failure."""
        if not is_unavailable(error):
            log.warning("Node watch: %s (trying again)", describe(error))
        if self._outage is None:
            self._outage = describe(error)
            log.error(
                "Lost the Kubernetes API server (%s); forwarding continues with the routes known, trying again "
                "every %.0f s",
                self._outage,
                RETRY,
            )

    def _recovered(self) -> None:
        if self._outage is not None:
            log.info(
                "The Kubernetes API server is reachable again (resuming the node watch at resourceVersion %s)",
                self.resource_version,
            )
            self._outage = None

    async def _list(self, from_cache: bool = True) -> None:
        """List the nodes. As client-go's reflector: resourceVersion "0" lets the API server answer from its watch
        cache (no quorum read of etcd per node; with 1,000 nodes starting together those reads made the server time
        out connections); after a 410 the list is a quorum read, since the cache's version is the one that expired."""
        nodes, self.resource_version = await list_nodes(self.client, "0" if from_cache else None)
        self.nodes = {node_name(node): node for node in nodes}
        self.lists += 1
        if self.lists > 1:
            self.on_relist()
        self.changed.set()

    async def _run(self) -> None:
        while True:
            try:
                await self._watch()
            except ApiError as e:
                if e.status.code == 410:
                    log.info("Node watch expired (%s); listing the nodes again", describe(e))
                    self.resource_version = None
                    await self._retrying(lambda: self._list(from_cache=False))
                    continue
                self._failed(e)
            except (httpx2.HTTPError, OSError, NodeStreamError) as e:
                self._failed(e)
            await asyncio.sleep(RETRY)
            # Resume from the last version seen once the server answers again; nothing is listed anew.
            await self._retrying(self._probe)

    async def _probe(self) -> None:
        try:
            await self.client.get(Node, self.probe_node)
        except ApiError as e:
            if e.status.code != 404:
                raise

    async def _watch(self) -> None:
        async for kind, node in watch_nodes(self.client, self.resource_version):
            self._recovered()
            version = node.metadata.resourceVersion if node.metadata else None
            if version:
                self.resource_version = version
            if kind not in ("ADDED", "MODIFIED", "DELETED"):
                continue  # BOOKMARK: only its version matters
            name = node_name(node)
            old = self.nodes.get(name)
            if kind == "DELETED":
                self.nodes.pop(name, None)
                self.on_change(old, None)
            else:
                self.nodes[name] = node
                self.on_change(old, node)
            self.changed.set()
