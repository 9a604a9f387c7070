"""The TUN side of the udp data plane: reads, writes, and (with TUN offloads) the gluing of received TCP segments into
one super-packet write. The virtio split of reads is offload.pxd's plan_gso/build_segment_header, used by the pump."""
from libc.stdint cimport uint8_t, uint64_t

from _fastpath.clib cimport iovec
from _fastpath.offload cimport (
    COALESCE_MAX_SEGMENTS,
    VNET_HDR_LEN,
    Coalescer,
    coalescer_append,
    coalescer_start,
    tcp_segment_can_start,
    tcp_segment_continues,
)


cdef class TunSide:
    cdef int fd
    cdef readonly bint vnet_hdr  # reads and writes carry a virtio_net_hdr (TUN offloads on)
    cdef Coalescer co  # the TCP flow being glued, if any
    cdef iovec co_iov[COALESCE_MAX_SEGMENTS + 1]  # the virtio header, the first packet, then later payloads
    cdef uint8_t vnet_out[VNET_HDR_LEN]
    cdef uint8_t vnet_zero[VNET_HDR_LEN]
    cdef uint64_t writes, coalesced_writes, written_packets, written_bytes, write_failed

    cdef Py_ssize_t read(self, uint8_t* buf, Py_ssize_t size) noexcept nogil
    cdef Py_ssize_t write(self, uint8_t* pkt, Py_ssize_t length) noexcept nogil
    cdef void flush(self) noexcept nogil


cdef inline void deliver(TunSide tun, uint8_t* pkt, Py_ssize_t length) noexcept nogil:
    """A checked packet for the pods: written now, or held to be glued to the next segments of its TCP flow (inline:
    it runs once per received packet)."""
    if tun.vnet_hdr:
        if tcp_segment_continues(&tun.co, pkt, length):
            coalescer_append(&tun.co, pkt, length)
            tun.co_iov[tun.co.count].iov_base = pkt + tun.co.hlen
            tun.co_iov[tun.co.count].iov_len = length - tun.co.hlen
            return
        tun.flush()
        if tcp_segment_can_start(pkt, length):
            coalescer_start(&tun.co, pkt, length)
            tun.co_iov[1].iov_base = pkt
            tun.co_iov[1].iov_len = length
            return
    if tun.write(pkt, length) != length:
        tun.write_failed += 1
        return
    tun.written_packets += 1
    tun.written_bytes += length
