"""The TUN side's real write path, read back: a socketpair stands in for the TUN device."""

import socket

from _fastpath.tun import TunSide


def coalesce(packets: list[bytes]) -> list[bytes]:
    """What the pump's TUN side writes (virtio header + packet per write) for these received packets, in order."""
    app, pump = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with app, pump:
        pump.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        TunSide(pump.fileno(), vnet_hdr=True).deliver_all(packets)
        app.setblocking(False)
        writes = []
        while True:
            try:
                writes.append(app.recv(1 << 17))
            except BlockingIOError:
                return writes
