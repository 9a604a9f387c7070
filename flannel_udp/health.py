"""/healthz, /readyz (upstream's texts) and /metrics (Prometheus) on one small asyncio HTTP server."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .backend import Network

log = logging.getLogger(__name__)


class NodeState:
    """What the health endpoints report; the daemon fills it in as it starts."""

    def __init__(self) -> None:
        self.ready = False
        self.network: Network | None = None  # once registered
        self.lease_expiration: float | None = None

    def collect(self):
        families = list(self.network.collect_metrics()) if self.network is not None else []
        expiry = GaugeMetricFamily(
            "flannel_lease_expiry_seconds", "Seconds until the own lease expires (-1: no expiry)"
        )
        if self.lease_expiration is not None:
            expiry.add_metric([], self.lease_expiration - time.time())
        elif self.network is not None:
            expiry.add_metric([], -1)
        families.append(expiry)
        return families


class HealthError(RuntimeError):
    """The health endpoint cannot listen (port in use, address not on this host): a start-up error of the user's."""


class HealthServer:
    def __init__(self, state: NodeState, host: str, port: int) -> None:
        self.state = state
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(state)
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno else str(e)  # uvloop's own wording repeats the address
            raise HealthError(
                f"cannot serve /healthz on {self.host}:{self.port}: {reason} (-healthz-ip, -healthz-port)"
            ) from None
        log.info("Serving /healthz, /readyz and /metrics on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 3)
            except TimeoutError:
                pass

    def _respond(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"flanneld is running"
        if path == "/readyz":
            if self.state.ready:
                return 200, "text/plain; charset=utf-8", b"flanneld is ready"
            return 503, "text/plain; charset=utf-8", b"flanneld is not ready yet"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        return 404, "text/plain; charset=utf-8", b"404 page not found\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass  # headers are not needed
            parts = request.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else "/"
            status, ctype, body = self._respond(path)
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
