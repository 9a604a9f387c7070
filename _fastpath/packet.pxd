"""Per-packet checks and rewrites shared by the pump and by the capture mode's verdicts (one implementation)."""
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from _fastpath.checksum cimport checksum, fold, sum16
from _fastpath.routes cimport RouteTable, be64

# Why a packet was dropped; the names in packet.pyx VERDICT_NAMES follow this order.
cdef enum:
    V_OK = 0
    V_SHORT = 1            # fewer than 20 bytes (IPv4) or 40 (IPv6)
    V_NOT_IPV4 = 2         # neither IPv4 nor IPv6 on a node that carries IPv6 (without an IPv6 subnet: any IPv6)
    V_BAD_HEADER = 3       # IHL < 5 or beyond the packet; an IPv6 extension header chain that is broken or too long
    V_BAD_LENGTH = 4       # total (IPv6: payload) length differs from the datagram/packet length
    V_BAD_CHECKSUM = 5     # IPv4 header checksum wrong
    V_TTL_EXPIRED = 6      # TTL (IPv6: hop limit) would reach 0
    V_NO_ROUTE = 7         # destination in no lease (answered with ICMP net-unreachable / ICMPv6 no route)
    V_UNKNOWN_PEER = 8     # datagram from an address that is no lease's PublicIP
    V_SPOOFED_SOURCE = 9   # inner source outside the sending peer's subnet
    V_NOT_LOCAL = 10       # inner destination outside this node's subnet
    V_TRUNCATED = 11       # datagram larger than the receive buffer
    V_SEND_FAILED = 12     # the underlay refused the datagram
    V_TUN_WRITE_FAILED = 13
    V_BAD_OFFLOAD = 14     # a TUN super-packet whose virtio header does not fit its contents
    V_NOT_UNICAST = 15     # IPv6 to a multicast or link-local address (the kernel's own MLD and RS on flannel0)
    V_NOT_IPV6 = 16        # anything but IPv6 on a node of an IPv6-only network
    V_COUNT = 17

# IPv6 extension headers walked by check_ipv6 (RFC 8200): hop-by-hop, routing, fragment, destination options, AH.
cdef enum:
    MAX_EXTENSION_HEADERS = 8
    ICMP6_ERROR_MAX = 1280  # an ICMPv6 error never exceeds the IPv6 minimum MTU (RFC 4443 2.4 c)


cdef struct OwnSubnets:
    # This node's subnets: where an inbound packet may go, and the TUN's addresses as ICMP sources.
    bint has4  # false in an IPv6-only network: then every packet must be IPv6
    uint32_t net4
    uint32_t mask4
    uint32_t addr4
    bint has6
    uint64_t net6_hi
    uint64_t net6_lo
    uint64_t mask6_hi
    uint64_t mask6_lo
    uint8_t addr6[16]


cdef OwnSubnets own_subnets(own_subnet, own_subnet6=*) except *


cdef inline uint32_t be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint16_t be16(const uint8_t* p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])


cdef inline void put_be16(uint8_t* p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xFF


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
    if checksum(p, ihl) != 0:
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


cdef inline int check_ipv6(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """Structural checks of an IPv6 packet of exactly n bytes: the payload length, and an extension header chain that
    ends inside the packet within MAX_EXTENSION_HEADERS headers, hop-by-hop only first (no jumbograms)."""
    cdef Py_ssize_t offset = 40, length
    cdef int next_header, count = 0
    if n < 40:
        return V_SHORT
    if (p[0] >> 4) != 6:
        return V_NOT_IPV4
    if be16(p + 4) + 40 != n:
        return V_BAD_LENGTH
    next_header = p[6]
    while next_header == 0 or next_header == 43 or next_header == 44 or next_header == 60 or next_header == 51:
        if (next_header == 0 and count > 0) or count >= MAX_EXTENSION_HEADERS or offset + 8 > n:
            return V_BAD_HEADER
        if next_header == 44:
            length = 8
        elif next_header == 51:
            length = (p[offset + 1] + 2) * 4
        else:
            length = (p[offset + 1] + 1) * 8
        next_header = p[offset]
        offset += length
        count += 1
        if offset > n:
            return V_BAD_HEADER
    return V_OK


cdef inline bint ipv6_unicast(const uint8_t* a) noexcept nogil:
    """Not multicast (ff00::/8), not link-local (fe80::/10), not unspecified: an address a tunnel may carry."""
    cdef int i
    if a[0] == 0xFF or (a[0] == 0xFE and (a[1] & 0xC0) == 0x80):
        return False
    for i in range(16):
        if a[i]:
            return True
    return False


cdef inline bint in_own6(const OwnSubnets* own, const uint8_t* a) noexcept nogil:
    return own.has6 and (be64(a) & own.mask6_hi) == own.net6_hi and (be64(a + 8) & own.mask6_lo) == own.net6_lo


cdef inline int decrement_hop_limit(uint8_t* p) noexcept nogil:
    """Hop limit - 1 (IPv6 has no header checksum); 0 or 1 is dropped as for IPv4's TTL."""
    if p[7] <= 1:
        return V_TTL_EXPIRED
    p[7] -= 1
    return V_OK


cdef inline int decrement_hops(uint8_t* p) noexcept nogil:
    """TTL or hop limit - 1, whichever family the (checked) packet is."""
    return decrement_ttl(p) if (p[0] >> 4) == 4 else decrement_hop_limit(p)


cdef inline int classify_outbound(const uint8_t* p, Py_ssize_t n, RouteTable routes, const OwnSubnets* own,
                                  bint super_packet, int32_t* peer) noexcept nogil:
    """Verdict on a packet read from the TUN; sets *peer to the peer it goes to (or -1). A super-packet's IPv4 header
    checksum is not checked: every segment cut from it gets a fresh one."""
    cdef int verdict
    peer[0] = -1
    if not own.has4 and (n < 1 or (p[0] >> 4) != 6):
        return V_SHORT if n < 1 else V_NOT_IPV6
    if n >= 1 and (p[0] >> 4) == 6 and own.has6:
        verdict = check_ipv6(p, n)
        if verdict != V_OK:
            return verdict
        if not ipv6_unicast(p + 24):
            return V_NOT_UNICAST
        peer[0] = routes.lookup6(p + 24)
        if peer[0] < 0:
            return V_NO_ROUTE
        return V_TTL_EXPIRED if p[7] <= 1 else V_OK
    verdict = check_ipv4(p, n)
    if verdict == V_BAD_CHECKSUM and super_packet:
        verdict = V_OK
    if verdict != V_OK:
        return verdict
    peer[0] = routes.lookup(be32(p + 16))
    if peer[0] < 0:
        return V_NO_ROUTE
    return V_TTL_EXPIRED if p[8] <= 1 else V_OK


cdef inline int classify_inbound(const uint8_t* p, Py_ssize_t n, int32_t peer, RouteTable routes,
                                 const OwnSubnets* own, bint protect) noexcept nogil:
    """Verdict on a datagram payload from the peer with index `peer` (-1: the sender is no lease's public address).
    With protect, the inner source must be routed to that same peer and the inner destination be in our subnet."""
    cdef int verdict
    cdef bint v6 = n >= 1 and (p[0] >> 4) == 6 and own.has6
    if not own.has4 and not v6:
        return V_SHORT if n < 1 else V_NOT_IPV6
    verdict = check_ipv6(p, n) if v6 else check_ipv4(p, n)
    if verdict != V_OK:
        return verdict
    if protect:
        if peer < 0:
            return V_UNKNOWN_PEER
        if v6:
            if routes.lookup6(p + 8) != peer:
                return V_SPOOFED_SOURCE
            if not in_own6(own, p + 24):
                return V_NOT_LOCAL
        else:
            if routes.lookup(be32(p + 12)) != peer:
                return V_SPOOFED_SOURCE
            if (be32(p + 16) & own.mask4) != own.net4:
                return V_NOT_LOCAL
    if (p[7] if v6 else p[8]) <= 1:
        return V_TTL_EXPIRED
    return V_OK


cdef inline Py_ssize_t build_no_route6(const uint8_t* offender, Py_ssize_t n, const uint8_t* own_addr,
                                       uint8_t* out) noexcept nogil:
    """ICMPv6 destination unreachable, code 0 (no route), for an unroutable IPv6 packet of n checked bytes: as much of
    it as fits in 1280 bytes (RFC 4443 3.1). 0 when suppressed: the offender is itself an ICMPv6 error, or its source
    is not a unicast address (RFC 4443 2.4 e). out must hold ICMP6_ERROR_MAX bytes."""
    cdef Py_ssize_t quoted = n if n <= ICMP6_ERROR_MAX - 48 else ICMP6_ERROR_MAX - 48
    cdef Py_ssize_t payload = 8 + quoted
    if not ipv6_unicast(offender + 8) or (offender[6] == 58 and n > 40 and offender[40] < 128):
        return 0
    memset(out, 0, 48)
    out[0] = 0x60
    put_be16(out + 4, <uint16_t>payload)
    out[6] = 58  # ICMPv6
    out[7] = 64
    memcpy(out + 8, own_addr, 16)
    memcpy(out + 24, offender + 8, 16)
    out[40] = 1  # destination unreachable
    out[41] = 0  # no route to destination
    memcpy(out + 48, offender, quoted)
    # Checksum over the pseudo-header (addresses, upper-layer length, next header) and the message.
    cdef uint64_t total = <uint64_t>sum16(out + 8, 32) + <uint32_t>payload + 58 + sum16(out + 40, payload)
    put_be16(out + 42, <uint16_t>(~fold(total) & 0xFFFF))
    return 40 + payload


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
    put_be16(out + 10, checksum(out, 20))
    out[20] = 3
    out[21] = 0
    copy = quoted if quoted <= n else n
    memcpy(out + 28, offender, copy)
    put_be16(out + 22, checksum(out + 20, 8 + quoted))
    return total
