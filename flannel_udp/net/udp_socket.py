"""The udp backend's kernel plumbing: its UDP sockets (one per underlay family, large buffers, UDP GRO), the kernel's
drop counters in front of the pump, and flannel0's accept_local."""

from __future__ import annotations

import errno
import logging
import socket
import sys

from _fastpath.udp import UDP_GRO_OPTION

log = logging.getLogger(__name__)

SOCKET_BUFFER = 4 << 20
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
SO_MEMINFO, SK_MEMINFO_DROPS = 55, 8  # the socket's own drop counter (a full receive buffer), as `ss -m` shows it


class SocketError(RuntimeError):
    """A socket that cannot be opened: a busy port, an address not on this node."""


def open_socket(address: str, port: int) -> socket.socket:
    """The underlay socket of the address's family (an IPv6 one carries only IPv6: the IPv4 socket has the rest)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
        sock.bind((address, port))
    except OSError as e:
        sock.close()
        where = f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}"
        if e.errno == errno.EADDRINUSE:
            raise SocketError(
                f"UDP port {port} on {address} is already in use (is another flanneld running?)"
            ) from None
        raise SocketError(f"cannot bind the UDP socket to {where}: {e.strerror}") from None
    return sock


def enable_gro(sock: socket.socket) -> bool:
    """UDP_GRO (Linux 5.0+): one receive may then carry a run of datagrams from one sender."""
    try:
        level, option = UDP_GRO_OPTION
        sock.setsockopt(level, option, 1)
        return True
    except OSError as e:
        log.warning("UDP GRO unavailable (%s); receiving one datagram per message", e.strerror)
        return False


def accept_local_icmp(tun_name: str) -> None:
    """Let the kernel accept our ICMP net-unreachable, whose source (the subnet's .0, as upstream) is flannel0's own
    address: without accept_local Linux drops it as a martian source and the sender never learns the net is gone."""
    try:
        with open(f"/proc/sys/net/ipv4/conf/{tun_name}/accept_local", "w") as f:
            f.write("1")
    except OSError as e:
        log.warning(
            "Cannot set accept_local on %s (%s): ICMP net-unreachable will not reach local senders", tun_name, e
        )


def socket_drops(sock: socket.socket) -> int:
    """Datagrams the kernel dropped because the socket's receive buffer was full (its SO_MEMINFO drop counter)."""
    meminfo = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * (SK_MEMINFO_DROPS + 1))
    return int.from_bytes(meminfo[4 * SK_MEMINFO_DROPS : 4 * SK_MEMINFO_DROPS + 4], sys.byteorder)


def tun_queue_drops(tun_name: str) -> int:
    """Packets the kernel dropped because the TUN's queue towards the pump was full (its tx_dropped)."""
    try:
        with open(f"/sys/class/net/{tun_name}/statistics/tx_dropped") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0
