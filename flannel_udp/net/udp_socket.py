"""The udp backend's kernel plumbing: its UDP sockets (one per underlay family, large buffers, UDP GRO), the kernel's
drop counters in front of the pump, and flannel0's accept_local."""

from __future__ import annotations

import errno
import logging
import os
import random
import socket
import struct
import sys

from _fastpath.udp import UDP_GRO_OPTION

log = logging.getLogger(__name__)

SOCKET_BUFFER = 8 << 20  # ~7 ms at 10 Gbit/s: a packet thread briefly off its core drops nothing
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
SO_MEMINFO, SK_MEMINFO_DROPS = 55, 8
SOURCE_PORT_ATTEMPTS = 256  # the socket's own drop counter (a full receive buffer), as `ss -m` shows it


class SocketError(RuntimeError):
    """A socket that cannot be opened: a busy port, an address not on this node."""


def open_socket(address: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The underlay socket of the address's family (an IPv6 one carries only IPv6: the IPv4 socket has the rest).
    reuse_port: one of a SO_REUSEPORT group on the port (one per packet thread)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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


def open_source_socket(address: str, index: int, workers: int) -> socket.socket:
    """The socket packet thread `index` of `workers` sends from: bound to a free port p with p mod workers == index in
    the ephemeral range, so that its datagrams' source port names it to the receiver (net/steering.py)."""
    low, high = 32768, 60999
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(value) for value in f.read().split())
    except (OSError, ValueError):
        pass
    candidates = list(range(low + (index - low) % workers, high + 1, workers))
    start = random.randrange(len(candidates))  # nodes restarting do not all reach for the same ports
    for port in (candidates[start:] + candidates[:start])[:SOURCE_PORT_ATTEMPTS]:
        try:
            return open_socket(address, port)
        except SocketError:
            continue
    raise SocketError(f"no free UDP source port on {address} for packet thread {index} of {workers}")


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
        set_ipv4_devconf(socket.if_nametoindex(tun_name), IPV4_DEVCONF_ACCEPT_LOCAL, 1)
    except OSError as e:
        log.warning(
            "Cannot set accept_local on %s (%s): ICMP net-unreachable will not reach local senders", tun_name, e
        )


RTM_SETLINK, NLMSG_ERROR, NLM_F_REQUEST, NLM_F_ACK = 19, 2, 1, 4
IFLA_AF_SPEC, IFLA_INET_CONF, IPV4_DEVCONF_ACCEPT_LOCAL = 26, 1, 23


def _attribute(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def set_ipv4_devconf(ifindex: int, option: int, value: int) -> None:
    """One IPv4 setting of a device (net.ipv4.conf.<dev>.*) through netlink, which needs only CAP_NET_ADMIN: in a
    container, as the DaemonSet runs the node, /proc/sys is read-only. pyroute2 encodes IFLA_INET_CONF as the kernel
    dumps it (one array) and not as the nested attributes the kernel takes for a change, so the request is made
    here: RTM_SETLINK with IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF { option: value } } }."""
    conf = _attribute(IFLA_INET_CONF, _attribute(option, struct.pack("=I", value)))
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, ifindex, 0, 0)
    body += _attribute(IFLA_AF_SPEC, _attribute(socket.AF_INET, conf))
    header = struct.pack("=IHHII", 16 + len(body), RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5)
        sock.send(header + body)
        reply = sock.recv(4096)
    if struct.unpack_from("=H", reply, 4)[0] == NLMSG_ERROR:
        error = -struct.unpack_from("=i", reply, 16)[0]
        if error:
            raise OSError(error, os.strerror(error))


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
