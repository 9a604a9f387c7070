"""Opening the TUN device (pyroute2 makes only persistent TUNs and hands out no fd, so the ioctl is done here)."""
from __future__ import annotations

import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


class TunError(RuntimeError):
    pass


def open_tun(name_template: str = "flannel%d") -> tuple[int, str]:
    """A non-persistent, non-blocking TUN (IFF_TUN|IFF_NO_PI, as upstream); it disappears when the fd is closed."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TunError("/dev/net/tun does not exist: load the tun module (modprobe tun) or give the container the device") from None
    except PermissionError:
        raise TunError("cannot open /dev/net/tun: permission denied (flannel-udp needs CAP_NET_ADMIN)") from None
    try:
        request = struct.pack("16sH22x", name_template.encode(), IFF_TUN | IFF_NO_PI)
        reply = fcntl.ioctl(fd, TUNSETIFF, request)
    except OSError as e:
        os.close(fd)
        raise TunError(f"cannot create TUN device {name_template}: {e.strerror}") from None
    return fd, reply[:16].rstrip(b"\0").decode()
