"""Per-packet checks and rewrites shared by the pump and by the capture mode's verdicts (one implementation)."""
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy, memset

from _fastpath.routes cimport RouteTable

# Why a packet was dropped; the names in packet.pyx VERDICT_NAMES follow this order.
cdef enum:
    V_OK = 0
    V_SHORT = 1            # fewer than 20 bytes
    V_NOT_IPV4 = 2         # version nibble is not 4 (e.g. IPv6 router solicitations on the TUN)
    V_BAD_HEADER = 3       # IHL < 5 or beyond the packet
    V_BAD_LENGTH = 4       # total length differs from the datagram/packet length
    V_BAD_CHECKSUM = 5     # IPv4 header checksum wrong
    V_TTL_EXPIRED = 6      # TTL would reach 0
    V_NO_ROUTE = 7         # destination in no lease (answered with ICMP net-unreachable)
    V_UNKNOWN_PEER = 8     # datagram from an address that is no lease's PublicIP
    V_SPOOFED_SOURCE = 9   # inner source outside the sending peer's subnet
    V_NOT_LOCAL = 10       # inner destination outside this node's subnet
    V_TRUNCATED = 11       # datagram larger than the receive buffer
    V_SEND_FAILED = 12     # the underlay refused the datagram
    V_TUN_WRITE_FAILED = 13
    V_BAD_OFFLOAD = 14     # a TUN super-packet whose virtio header does not fit its contents
    V_COUNT = 15


cdef inline uint32_t be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint16_t be16(const uint8_t* p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])


cdef inline void put_be16(uint8_t* p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xFF


cdef inline uint32_t csum_add(uint32_t sum, const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i = 0
    while i + 1 < n:
        sum += (<uint32_t>p[i] << 8) | p[i + 1]
        i += 2
    if i < n:
        sum += <uint32_t>p[i] << 8
    return sum


cdef inline uint16_t csum_fold(uint32_t sum) noexcept nogil:
    while sum >> 16:
        sum = (sum & 0xFFFF) + (sum >> 16)
    return <uint16_t>(~sum & 0xFFFF)


cdef inline int check_ipv4(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """Structural checks of an IPv4 packet of exactly n bytes."""
    cdef Py_ssize_t ihl
    if n < 20:
        return V_SHORT
    if (p[0] >> 4) != 4:
        return V_NOT_IPV4
    ihl = (p[0] & 0x0F) * 4
    if ihl < 20 or ihl > n:
        return V_BAD_HEADER
    if be16(p + 2) != n:
        return V_BAD_LENGTH
    if csum_fold(csum_add(0, p, ihl)) != 0:
        return V_BAD_CHECKSUM
    return V_OK


cdef inline int decrement_ttl(uint8_t* p) noexcept nogil:
    """TTL - 1 with the header checksum patched as RFC 1624 eqn. 3 (bit-exact to upstream: 0xFEFF becomes 0x0000).

    A TTL of 0 or 1 is dropped (upstream wraps 0 to 255 and forwards it)."""
    cdef uint32_t old_word, new_word, sum
    if p[8] <= 1:
        return V_TTL_EXPIRED
    old_word = be16(p + 8)
    p[8] -= 1
    new_word = be16(p + 8)
    sum = (~be16(p + 10) & 0xFFFF) + (~old_word & 0xFFFF) + new_word
    while sum >> 16:
        sum = (sum & 0xFFFF) + (sum >> 16)
    put_be16(p + 10, <uint16_t>(~sum & 0xFFFF))
    return V_OK


cdef inline int classify_inbound(const uint8_t* p, Py_ssize_t n, uint32_t sender, RouteTable routes,
                                 uint32_t own_net, uint32_t own_mask, bint protect, int32_t* peer) noexcept nogil:
    """Verdict on a datagram payload from `sender` (host order); sets *peer to the sender's peer index or -1."""
    cdef int verdict = check_ipv4(p, n)
    cdef int32_t via
    peer[0] = routes.find_peer(sender)
    if verdict != V_OK:
        return verdict
    if protect:
        if peer[0] < 0:
            return V_UNKNOWN_PEER
        via = routes.lookup(be32(p + 12))
        if via != peer[0]:
            return V_SPOOFED_SOURCE
        if (be32(p + 16) & own_mask) != own_net:
            return V_NOT_LOCAL
    if p[8] <= 1:
        return V_TTL_EXPIRED
    return V_OK


cdef inline Py_ssize_t build_net_unreachable(const uint8_t* offender, Py_ssize_t n, uint32_t own_addr,
                                             uint8_t* out) noexcept nogil:
    """ICMP type 3 code 0 for an unroutable packet, as upstream; 0 when upstream's rules suppress it.

    out must hold 20 + 8 + 60 + 8 bytes. Bytes past the end of a short offender are zero, never stale."""
    cdef Py_ssize_t ihl = (offender[0] & 0x0F) * 4
    cdef Py_ssize_t quoted = ihl + 8, total = 20 + 8 + quoted, copy
    if ihl >= 60 or ihl < 20 or offender[9] == 1 or (be16(offender + 6) & 0x1FFF) != 0:
        return 0
    memset(out, 0, total)
    out[0] = 0x45
    put_be16(out + 2, <uint16_t>total)
    out[8] = 8  # TTL, as upstream
    out[9] = 1  # ICMP
    out[12] = (own_addr >> 24) & 0xFF
    out[13] = (own_addr >> 16) & 0xFF
    out[14] = (own_addr >> 8) & 0xFF
    out[15] = own_addr & 0xFF
    memcpy(out + 16, offender + 12, 4)
    put_be16(out + 10, csum_fold(csum_add(0, out, 20)))
    out[20] = 3
    out[21] = 0
    copy = quoted if quoted <= n else n
    memcpy(out + 28, offender, copy)
    put_be16(out + 22, csum_fold(csum_add(0, out + 20, 8 + quoted)))
    return total
