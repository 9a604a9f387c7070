"""What the udp pump and the wireguard pump share: a TUN side, a UDP side, the route table, the node's own subnets,
and the packet thread's loop that gives each ready fd its round."""
from libc.stdint cimport uint64_t

from _fastpath.packet cimport OwnSubnets
from _fastpath.routes cimport RouteTable
from _fastpath.tun cimport TunSide
from _fastpath.udp cimport UdpSide


cdef class PacketLoop:
    cdef readonly TunSide tun
    cdef readonly UdpSide udp
    cdef RouteTable routes
    cdef OwnSubnets own
    cdef uint64_t tun_read_packets, udp_received_packets, tso_reads, tso_segments

    # A round: what one readiness of the TUN queue (or of a socket) moves, bounded in work; each pump its own.
    cdef void _tun_round(self) noexcept nogil
    cdef void _socket_round(self, int fd, bint v6) noexcept nogil
