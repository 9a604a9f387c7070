"""The udp data plane's loop: read -> check -> route -> send, between a TunSide and a UdpSide."""
from libc.stdint cimport int32_t, uint8_t, uint64_t

from _fastpath.loop cimport PacketLoop
from _fastpath.offload cimport GsoPlan
from _fastpath.packet cimport ICMP6_ERROR_MAX, V_COUNT
from _fastpath.udp cimport BATCH

cdef enum:
    HDR_SLOT = 128  # a segment's IP + TCP headers: at most 60 + 60 bytes


cdef class Pump(PacketLoop):
    cdef bint protect
    cdef int burst
    cdef uint8_t* tx_bufs  # BATCH read buffers: a batch has at most one read per slot
    cdef uint8_t* tx_buf[BATCH]
    cdef uint8_t tx_hdr[BATCH][HDR_SLOT]  # per slot: the headers of a segment cut from a super-packet
    cdef GsoPlan plan
    cdef uint8_t icmp_buf[ICMP6_ERROR_MAX]
    cdef uint64_t drops_out[V_COUNT]
    cdef uint64_t drops_in[V_COUNT]
    cdef uint64_t icmp_sent, tun_wakeups, socket_wakeups

    cdef void _tun_round(self) noexcept nogil
    cdef void _socket_round(self, int fd, bint v6) noexcept nogil
    cdef void _tun_to_udp(self) noexcept nogil
    cdef int _queue(self, int n, uint8_t* head, Py_ssize_t head_len, uint8_t* payload, Py_ssize_t payload_len,
                    int32_t peer) noexcept nogil
    cdef void _answer_unreachable(self, const uint8_t* pkt, Py_ssize_t length) noexcept nogil
    cdef void _udp_to_tun(self, int fd, bint v6) noexcept nogil
    cdef void _deliver(self, uint8_t* buf, Py_ssize_t length, int32_t peer) noexcept nogil
