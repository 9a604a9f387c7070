"""Opening the TUN device (pyroute2 makes only persistent TUNs and hands out no fd, so the ioctl is done here)."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20  # Linux 6.2+; not in this machine's userspace header
TUN_F_USO6 = 0x40


class TunError(RuntimeError):
    pass


def open_tun_queues(
    queues: int, name_template: str = "flannel%d", offloads: bool = False
) -> tuple[list[int], str, int]:
    """A non-persistent, non-blocking TUN (IFF_TUN|IFF_NO_PI, as upstream) with `queues` queues (IFF_MULTI_QUEUE when
    more than one): one fd per queue, each a packet thread's; the device goes when the last is closed.

    With offloads, IFF_VNET_HDR too, and the kernel may hand over TCP (and, from 6.2, UDP) super-packets with partial
    checksums: returns the TUN_F_* flags it accepted (0 without offloads)."""
    flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offloads else 0) | (IFF_MULTI_QUEUE if queues > 1 else 0)
    fds: list[int] = []
    name, accepted = name_template, 0
    try:
        for _ in range(queues):
            fd = _open_device()
            fds.append(fd)
            try:
                reply = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
                name = reply[:16].rstrip(b"\0").decode()  # the later queues join the device the first one made
                if offloads and len(fds) == 1:
                    accepted = set_offloads(fd)  # the device's, set once through its first queue
            except OSError as e:
                raise TunError(f"cannot create TUN device {name}: {e.strerror}") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds, name, accepted


def _open_device() -> int:
    try:
        return os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TunError(
            "/dev/net/tun does not exist: load the tun module (modprobe tun) or give the container the device"
        ) from None
    except PermissionError:
        raise TunError("cannot open /dev/net/tun: permission denied (flannel-udp needs CAP_NET_ADMIN)") from None


def set_offloads(fd: int) -> int:
    """TCP segmentation offload with checksum offload, plus UDP segmentation where the kernel knows it (6.2+)."""
    for wanted in (
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6,
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
    ):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, wanted)
            return wanted
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            log.info("The kernel refuses TUN offloads %#x; trying fewer", wanted)
    return 0
