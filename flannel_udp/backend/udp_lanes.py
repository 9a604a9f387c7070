"""The udp backend's lanes: what each packet thread owns. One lane (-udp-workers=1) is upstream's layout: flannel0 and
one socket per underlay family on the listening port, sending from it. Several lanes split the same device and port:
each has a queue of the multi-queue flannel0, a receiving socket of a SO_REUSEPORT group on the listening port and a
socket of its own to send from, and the kernel keeps every flow on one lane (net/steering.py)."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from dataclasses import dataclass

from ..net import steering
from ..net.udp_socket import SocketError, open_socket, open_source_socket

log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class Lane:
    """One packet thread's queue of flannel0 and sockets (None: that family is not carried)."""

    tun_fd: int
    sock: socket.socket | None  # receives IPv4 underlay datagrams on the listening port
    sock6: socket.socket | None
    source: socket.socket | None = None  # sends IPv4 datagrams (None: from `sock`)
    source6: socket.socket | None = None

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.sock, self.sock6, self.source, self.source6) if s is not None]

    def close(self) -> None:
        for sock in self.sockets():
            sock.close()
        if self.tun_fd >= 0:
            os.close(self.tun_fd)
            self.tun_fd = -1


def open_sockets(addresses: list[Address], port: int, workers: int) -> list[Lane]:
    """The sockets of `workers` lanes on the interface's addresses (one per family carried); their TUN queues come
    later (tun_fd -1). A port already in use is refused even when that user also shares it by SO_REUSEPORT, so that
    two node agents never split one port's traffic."""
    lanes: list[Lane] = []
    try:
        if workers > 1:
            for address in addresses:
                open_socket(str(address), port).close()  # the port is free: nobody else's group is joined
        for index in range(workers):
            lane = Lane(-1, None, None)
            lanes.append(lane)
            for address in addresses:
                receiving = open_socket(str(address), port, reuse_port=workers > 1)
                sending = open_source_socket(str(address), index, workers) if workers > 1 else None
                if address.version == 4:
                    lane.sock, lane.source = receiving, sending
                else:
                    lane.sock6, lane.source6 = receiving, sending
        if workers > 1:
            for first in (lanes[0].sock, lanes[0].sock6):
                if first is not None:
                    steering.attach_reuseport_steering(first, workers)
    except OSError as e:  # the group's steering program was refused
        close_all(lanes)
        raise SocketError(f"cannot steer UDP port {port} among {workers} packet threads: {e.strerror}") from None
    except BaseException:
        close_all(lanes)
        raise
    return lanes


def attach_tun_queues(lanes: list[Lane], tun_fds: list[int]) -> None:
    """Give each lane its queue of flannel0, and with several, steer flannel0's flows by hash (else by the TUN's flow
    table, said once)."""
    for lane, fd in zip(lanes, tun_fds, strict=True):
        lane.tun_fd = fd
    steer_tun_flows("flannel0", tun_fds)


def steer_tun_flows(name: str, tun_fds: list[int]) -> None:
    """With several queues, steer the TUN's flows by hash (else by the TUN's flow table, said once)."""
    if len(tun_fds) < 2:
        return
    try:
        steering.steer_tun_by_flow(tun_fds[0])
    except (steering.SteeringError, OSError) as e:
        log.warning(
            "Cannot attach the flow-hash program to %s (%s; it needs CAP_BPF): the TUN's own flow table "
            "chooses each flow's packet thread, so a flow sent before any of its replies arrived may move once",
            name,
            e,
        )


def close_all(lanes: list[Lane]) -> None:
    for lane in lanes:
        lane.close()
