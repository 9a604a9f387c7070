"""Connecting to etcd the way flanneld does: an endpoint list, optional TLS and basic auth, through aetcd.

aetcd's own connect() dials one plain-text `host:port`. flanneld takes a comma list of URLs and TLS files, so the gRPC
channel is built here (one channel over every endpoint, `pick_first`: a node stays on one member and moves on when it
fails) and handed to an aetcd.Client, whose API does the rest.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import urllib.parse
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

log = logging.getLogger(__name__)

DEFAULT_ENDPOINTS = "http://127.0.0.1:4001,http://127.0.0.1:2379"
DEFAULT_PREFIX = "/coreos.com/network"
RPC_TIMEOUT = 5.0
# A listing of every lease is one large answer that etcd and a busy node take longer over than a point call; a node
# that gave up after RPC_TIMEOUT and asked again only repeated the work (1,000 simulated nodes lost ~50 watches per
# run to "Deadline Exceeded" on the listing that starts a watch).
LIST_TIMEOUT = 30.0
# gRPC's own reconnect backoff (default 1 s growing to 120 s) would keep a node blind long after etcd is back. Despite
# its name, min_reconnect_backoff is the time one connection attempt is given (gRPC core's minimum connect timeout),
# not a backoff: at 100 ms, a handshake slower than the backoff (an etcd far away, or busy with 1,000 nodes connecting
# at once) was abandoned and tried again, over and over. gRPC's default, 20 s, stays.
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 20000,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10000,
    "grpc.keepalive_timeout_ms": 5000,
    "grpc.keepalive_permit_without_calls": 1,
}


class EtcdConfigError(ValueError):
    """Bad endpoints or TLS files: the user must fix the flags."""


@dataclass(frozen=True)
class EtcdOptions:
    endpoints: str = DEFAULT_ENDPOINTS
    prefix: str = DEFAULT_PREFIX
    keyfile: str = ""
    certfile: str = ""
    cafile: str = ""
    username: str = ""
    password: str = ""

    @property
    def tls(self) -> bool:
        # As upstream: TLS only when both the key and the certificate are given.
        return bool(self.keyfile and self.certfile)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


def parse_endpoints(text: str) -> list[Endpoint]:
    endpoints = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        url = urllib.parse.urlsplit(item if "://" in item else f"http://{item}")
        try:
            port = url.port
        except ValueError:
            raise EtcdConfigError(f"invalid etcd endpoint {item!r}: bad port") from None
        if url.scheme not in ("http", "https") or not url.hostname:
            raise EtcdConfigError(f"invalid etcd endpoint {item!r}: expected http(s)://host:port")
        endpoints.append(Endpoint(url.hostname, port or 2379))
    if not endpoints:
        raise EtcdConfigError("no etcd endpoint given (-etcd-endpoints)")
    return endpoints


def channel_target(endpoints: list[Endpoint]) -> str:
    """One gRPC target for all endpoints: an address list when they are IP literals, else the first name."""

    def literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return ipaddress.ip_address(host)
        except ValueError:
            return None

    addresses = [literal(e.host) for e in endpoints]
    if len(endpoints) > 1 and all(a is not None and a.version == 4 for a in addresses):
        return "ipv4:" + ",".join(f"{e.host}:{e.port}" for e in endpoints)
    if len(endpoints) > 1 and all(a is not None and a.version == 6 for a in addresses):
        return "ipv6:" + ",".join(f"[{e.host}]:{e.port}" for e in endpoints)
    if len(endpoints) > 1:
        log.warning(
            "etcd endpoints mix host names and addresses; using only %s:%d", endpoints[0].host, endpoints[0].port
        )
    first = endpoints[0]
    return (
        f"[{first.host}]:{first.port}"
        if addresses[0] is not None and addresses[0].version == 6
        else f"{first.host}:{first.port}"
    )


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise EtcdConfigError(f"cannot read etcd {what} {path}: {e.strerror}") from None


def tls_credentials(opts: EtcdOptions) -> grpc.ChannelCredentials:
    """Read and check the TLS files now, so that a bad file is one clear error at start-up, not a failing channel."""
    key, cert = _read(opts.keyfile, "key file"), _read(opts.certfile, "certificate file")
    ca = _read(opts.cafile, "CA file") if opts.cafile else None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(opts.certfile, opts.keyfile)
    except ssl.SSLError as e:
        raise EtcdConfigError(
            f"etcd certificate {opts.certfile} and key {opts.keyfile} do not load: {e.reason or e}"
        ) from None
    if ca is not None:
        try:
            context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as e:
            raise EtcdConfigError(f"etcd CA file {opts.cafile} holds no usable certificate: {e}") from None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class EtcdClient(aetcd.Client):
    """aetcd.Client over a channel built from flanneld's options (several endpoints, TLS)."""

    def __init__(self, opts: EtcdOptions) -> None:
        self.endpoints = parse_endpoints(opts.endpoints)
        self.target = channel_target(self.endpoints)
        self._credentials = tls_credentials(opts) if opts.tls else None
        if self._credentials is None:
            log.warning("no certificate provided: connecting to etcd with http. This is insecure")
        self._connect_lock: asyncio.Lock | None = None
        super().__init__(
            host=self.endpoints[0].host,
            port=self.endpoints[0].port,
            username=opts.username or None,
            password=opts.password or None,
            timeout=RPC_TIMEOUT,
            options=CHANNEL_OPTIONS,
        )

    @property
    def description(self) -> str:
        return ",".join(f"{e.host}:{e.port}" for e in self.endpoints)

    async def connect(self) -> None:
        # Many calls start at once (a listing asks TTLs concurrently): one of them dials, the others wait for it.
        if self._connected.is_set():
            return
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if not self._connected.is_set():
                await self._dial()

    async def _dial(self) -> None:
        options = dict(self._options)
        if self._credentials is not None:
            # The certificate is checked against the first endpoint's name, whatever member answers.
            options["grpc.default_authority"] = self.endpoints[0].host
            self.channel = grpc.aio.secure_channel(self.target, self._credentials, options=list(options.items()))
        else:
            self.channel = grpc.aio.insecure_channel(self.target, options=list(options.items()))
        try:
            if self._username is not None:
                auth = rpc.AuthStub(self.channel)
                response = await auth.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout
                )
                self.metadata = (("token", response.token),)
        except grpc.aio.AioRpcError as e:
            await self.channel.close()
            self._init_channel_attrs()
            aetcd.exceptions._handle_exception(e)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._connected.set()

    async def list_prefix(self, prefix: bytes) -> Any:
        """Every key under `prefix` (an etcd RangeResponse: kvs and header), with LIST_TIMEOUT as its deadline."""
        await self.connect()
        request = rpc.RangeRequest(key=prefix, range_end=prefix_range_end(prefix))
        try:
            return await self.kvstub.Range(request, timeout=LIST_TIMEOUT, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            aetcd.exceptions._handle_exception(e)  # raises the ClientError that matches the status code

    async def watch_prefix_batches(self, prefix: bytes, start_revision: int) -> AsyncGenerator[Sequence, None]:
        """The events under `prefix` from `start_revision` on, one sequence per etcd WatchResponse as etcd sends them
        (a watch catching up gets many at once); an empty one first, once etcd has created the watch.

        One bidirectional Watch stream carries this one watch; leaving the iteration cancels the call. aetcd's own
        watch hands events over one at a time (a callback, a queue and a task per event) and gives up on a watch
        whose creation is slow: with 1,000 nodes starting together that machinery cost more CPU than the events
        themselves, and its creation timeouts lost watches. Raises aetcd's errors: RevisionCompactedError when
        `start_revision` is compacted away, ConnectionFailedError and the like when the stream breaks; returns when
        etcd ends the stream.
        """
        await self.connect()
        create = rpc.WatchCreateRequest(key=prefix, range_end=prefix_range_end(prefix), start_revision=start_revision)
        call = rpc.WatchStub(self.channel).Watch(metadata=self.metadata)
        try:
            await call.write(rpc.WatchRequest(create_request=create))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return
                if response.compact_revision:
                    raise aetcd.exceptions.RevisionCompactedError(response.compact_revision)
                if response.canceled:
                    raise aetcd.exceptions.ClientError(
                        f"etcd cancelled the watch: {response.cancel_reason or 'no reason'}"
                    )
                if response.created or response.events:
                    yield response.events
        except grpc.aio.AioRpcError as e:
            aetcd.exceptions._handle_exception(e)  # raises the ClientError that matches the status code
        finally:
            call.cancel()

    async def wait_until_reachable(self, limit: float) -> None:
        """Return when the channel is READY again, or after `limit` seconds, whichever comes first."""
        if self.channel is None:
            await asyncio.sleep(limit)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        state = self.channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self.channel.wait_for_state_change(state), left)
            except TimeoutError:
                return
            state = self.channel.get_state(try_to_connect=True)
