"""The Node fields flannel reads, decoded straight from the API server's JSON: lists and watch streams of Nodes.

A Node object carries far more than flannel needs (its status alone lists addresses, conditions and every image on
the node, and managedFields repeat the field names), and every node of the cluster receives every other node's
changes: at 1,000 nodes, two writes per node reach each of 1,000 watches. Through lightkube's models and httpx2's text
and line iterators one event cost ~125 µs of a node's CPU; here msgspec decodes the handful of fields below in C and
skips the rest, and the watch stream is split into lines from the raw bytes.

The structs keep the API's field names (metadata.name, spec.podCIDRs, ...), so the rest of the Kubernetes subnet
manager reads them as it would read lightkube's Node.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2
import msgspec
from lightkube import ApiError, AsyncClient
from lightkube.core.generic_client import GenericClient
from lightkube.models.meta_v1 import Status
from lightkube.resources.core_v1 import Node


class NodeMeta(msgspec.Struct):
    name: str = ""
    resourceVersion: str | None = None
    annotations: dict[str, str] | None = None


class NodeSpec(msgspec.Struct):
    podCIDR: str | None = None
    podCIDRs: list[str] | None = None


class NodeInfo(msgspec.Struct):
    """A Node as flannel sees it: its name and version, its annotations and its pod CIDRs."""

    metadata: NodeMeta | None = None
    spec: NodeSpec | None = None


class _ListMeta(msgspec.Struct):
    resourceVersion: str = ""
    # "continue" is a Python keyword: the field is renamed.
    next: str = msgspec.field(default="", name="continue")


class _NodeList(msgspec.Struct):
    metadata: _ListMeta = msgspec.field(default_factory=_ListMeta)
    items: list[NodeInfo] | None = None


class _WatchObject(msgspec.Struct):
    """A watch event's object: a Node, or (type ERROR) a Status with its code and message."""

    metadata: NodeMeta | None = None
    spec: NodeSpec | None = None
    code: int | None = None
    message: str | None = None
    reason: str | None = None


class _WatchEvent(msgspec.Struct):
    type: str
    object: _WatchObject


class NodeStreamError(ValueError):
    """The API server sent something that is not a Node list or watch event."""


# What a request to the API server or its Node stream may fail with: an answer, the transport, the socket, the stream.
KUBE_FAILURES = (ApiError, httpx2.HTTPError, OSError, NodeStreamError)


_list_decoder = msgspec.json.Decoder(_NodeList)
_event_decoder = msgspec.json.Decoder(_WatchEvent)


def decode_node_list(data: bytes) -> tuple[list[NodeInfo], str, str]:
    """(nodes, resourceVersion, continue token) of one NodeList page."""
    try:
        page = _list_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # msgspec reads bad UTF-8 in a string as the latter
        raise NodeStreamError(f"not a node list: {e}") from None
    return page.items or [], page.metadata.resourceVersion, page.metadata.next


def decode_watch_event(line: bytes) -> tuple[str, NodeInfo]:
    """(type, node) of one watch event; an ERROR event (410 Gone above all) raises ApiError with its status."""
    try:
        event = _event_decoder.decode(line)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # msgspec reads bad UTF-8 in a string as the latter
        raise NodeStreamError(f"not a watch event: {e}") from None
    obj = event.object
    if event.type == "ERROR":
        raise ApiError(status=Status(code=obj.code, message=obj.message, reason=obj.reason))
    return event.type, NodeInfo(obj.metadata, obj.spec)


class LineSplitter:
    """The server writes one JSON object per line; a chunk of the stream may hold several lines, or part of one (a
    Node larger than a TLS record arrives in pieces)."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The complete, non-empty lines that this chunk ends."""
        lines = (self.pending + chunk if self.pending else chunk).split(b"\n")
        self.pending = lines.pop()
        return [line for line in lines if line]


def _request(client: AsyncClient, params: dict, watch: bool) -> httpx2.Request:
    """A GET of /api/v1/nodes with the client's server, credentials and timeouts (a watch waits for events without a
    read timeout)."""
    generic = client._client
    basic = generic.prepare_request("list", res=Node, watch=watch, params=params)
    timeout = generic._watch_timeout if watch else httpx2.USE_CLIENT_DEFAULT
    return generic._client.build_request(basic.method, basic.url, params=basic.params, timeout=timeout)


async def _checked(response: httpx2.Response) -> None:
    """Raise for a refusal as lightkube does: ApiError when the server explains itself (a Status body)."""
    if response.status_code != 200:
        await response.aread()
        GenericClient.raise_for_status(response)


async def list_nodes(client: AsyncClient, resource_version: str | None) -> tuple[list[NodeInfo], str]:
    """Every Node and the list's resourceVersion, page after page if the server cuts the list."""
    params: dict = {"resourceVersion": resource_version}
    nodes: list[NodeInfo] = []
    while True:
        response = await client._client._client.send(_request(client, params, watch=False))
        await _checked(response)
        page, version, token = decode_node_list(response.content)
        nodes.extend(page)
        if not token:
            return nodes, version
        params = {"continue": token}


async def watch_nodes(client: AsyncClient, resource_version: str | None) -> AsyncIterator[tuple[str, NodeInfo]]:
    """(type, node) for each event after `resource_version`, BOOKMARKs included, until the server ends the stream.
    Raises ApiError (410 Gone: that version left the server's history), httpx2 errors when the stream breaks."""
    params = {"resourceVersion": resource_version, "allowWatchBookmarks": "true"}
    response = await client._client._client.send(_request(client, params, watch=True), stream=True)
    try:
        await _checked(response)
        lines = LineSplitter()
        async for chunk in response.aiter_bytes():
            for line in lines.feed(chunk):
                yield decode_watch_event(line)
    finally:
        await response.aclose()
