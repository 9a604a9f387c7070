# cython: language_level=3
"""Python face of offload.pxd, for table-driven tests and fuzzing; the pump calls the same inline functions."""
import sys


if sys.byteorder != "little":
    raise ImportError("the virtio_net_hdr handling assumes a little-endian machine")

VNET_HEADER_LENGTH = VNET_HDR_LEN
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4 = VNET_GSO_NONE, VNET_GSO_TCPV4, VNET_GSO_TCPV6, VNET_GSO_UDP_L4
NEEDS_CSUM = VNET_F_NEEDS_CSUM


def split(const unsigned char[:] read):
    """What the pump makes of one TUN read (virtio header + packet): the standalone packets it sends.

    Raises ValueError where the pump would drop the read as bad_offload."""
    if read.shape[0] < VNET_HDR_LEN:
        raise ValueError("shorter than a virtio header")
    data = bytearray(read)
    cdef unsigned char[:] view = data
    cdef GsoPlan plan
    cdef Py_ssize_t n = view.shape[0] - VNET_HDR_LEN
    if plan_gso(&view[0], &view[VNET_HDR_LEN], n, &plan) < 0:
        raise ValueError("virtio header does not fit the packet")
    if plan.gso_type == VNET_GSO_NONE:
        return [bytes(data[VNET_HDR_LEN:])]
    out = bytearray(65536)
    cdef unsigned char[:] out_view = out
    segments = []
    cdef int i
    cdef Py_ssize_t length
    for i in range(plan.segments):
        length = build_segment(&view[VNET_HDR_LEN], n, &plan, i, &out_view[0])
        segments.append(bytes(out[:length]))
    return segments


def internet_checksum(const unsigned char[:] data):
    """RFC 1071 checksum of data (complemented), as the fast path computes it."""
    if data.shape[0] == 0:
        return 0xFFFF
    return ~sum16(&data[0], data.shape[0]) & 0xFFFF
