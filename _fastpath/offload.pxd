"""TUN offloads (IFF_VNET_HDR): cutting the kernel's TCP/UDP super-packets (IPv4 or IPv6) into standalone packets for
the wire, and gluing received TCP segments of one flow back into one super-packet for a single TUN write.

Every packet sent stays upstream's wire format: a complete IP packet with correct IP, TCP and UDP checksums (over the
IPv6 pseudo-header for IPv6), so a peer running upstream flanneld understands it. The virtio_net_hdr fields are
little-endian (x86, arm64; checked at import by offload.pyx). Rules for gluing follow the kernel's GRO: same addresses,
ports, ToS, TTL, DF, TCP option bytes and ACK number; no IPv4 options, no fragments, no IPv6 extension headers;
consecutive sequence numbers; equal segment sizes with only the last one shorter;
a PSH, FIN, SYN, RST, URG, ECE or CWR flag ends (or prevents) a run.
"""
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from _fastpath.checksum cimport fold, sum16
from _fastpath.packet cimport be16, be32, put_be16

cdef enum:
    VNET_HDR_LEN = 10
    VNET_F_NEEDS_CSUM = 1
    VNET_GSO_NONE = 0
    VNET_GSO_TCPV4 = 1
    VNET_GSO_TCPV6 = 4
    VNET_GSO_UDP_L4 = 5
    VNET_GSO_ECN = 0x80
    TCP_FIN = 0x01
    TCP_SYN = 0x02
    TCP_RST = 0x04
    TCP_PSH = 0x08
    TCP_ACK = 0x10
    TCP_CWR = 0x80
    IP_MAX_LENGTH = 65535
    COALESCE_MAX_SEGMENTS = 64


cdef inline uint16_t le16(const uint8_t* p) noexcept nogil:
    return <uint16_t>(p[0] | (p[1] << 8))


cdef inline void put_le16(uint8_t* p, uint16_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = v >> 8


cdef inline void put_be32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline uint32_t pseudo_header_sum(const uint8_t* ip, uint8_t proto, uint32_t l4_length) noexcept nogil:
    """The pseudo-header's share of a TCP/UDP checksum: addresses (IPv4's 8 bytes or IPv6's 32), protocol, length."""
    if (ip[0] >> 4) == 6:
        return fold(<uint64_t>sum16(ip + 8, 32) + proto + l4_length)
    return fold(<uint64_t>sum16(ip + 12, 8) + proto + l4_length)


cdef inline void set_ipv4_checksum(uint8_t* ip, Py_ssize_t ihl) noexcept nogil:
    ip[10] = 0
    ip[11] = 0
    put_be16(ip + 10, <uint16_t>(~sum16(ip, ihl) & 0xFFFF))


cdef inline void set_l4_checksum_parts(uint8_t* ip, Py_ssize_t ihl, Py_ssize_t hlen, const uint8_t* payload,
                                       Py_ssize_t payload_len, uint8_t proto, Py_ssize_t field) noexcept nogil:
    """The full TCP (field 16) or UDP (field 6) checksum of a packet whose headers ip[0:hlen] and payload may lie
    apart (a zero-copy segment); UDP's 0 is sent as 0xFFFF. hlen is even, so the two sums simply add up."""
    cdef uint8_t* l4 = ip + ihl
    cdef uint16_t value
    l4[field] = 0
    l4[field + 1] = 0
    value = <uint16_t>(~fold(<uint64_t>pseudo_header_sum(ip, proto, <uint32_t>(hlen - ihl + payload_len))
                             + sum16(l4, hlen - ihl) + sum16(payload, payload_len)) & 0xFFFF)
    if value == 0 and proto == 17:
        value = 0xFFFF
    put_be16(l4 + field, value)


cdef inline void set_l4_checksum(uint8_t* ip, Py_ssize_t ihl, Py_ssize_t total, uint8_t proto,
                                 Py_ssize_t field) noexcept nogil:
    """The same for a complete packet in one piece."""
    set_l4_checksum_parts(ip, ihl, total, ip + total, 0, proto, field)


cdef struct GsoPlan:
    # How to cut one super-packet read from the TUN.
    int gso_type        # VNET_GSO_NONE: a single packet
    Py_ssize_t ihl      # IP header length (IPv6: 40)
    Py_ssize_t hlen     # IPv4 + TCP/UDP header length, recomputed (the kernel's hdr_len is not trusted)
    Py_ssize_t mss      # payload bytes per segment
    int segments


cdef inline int plan_gso(const uint8_t* hdr, uint8_t* pkt, Py_ssize_t n, GsoPlan* plan) noexcept nogil:
    """Read the virtio_net_hdr of a TUN read; 0 when the packet can be handled, -1 when it is malformed.

    A packet without segmentation but with NEEDS_CSUM gets its checksum completed here. A super-packet's TCP or UDP
    header must follow the IP header directly (IPv4 options are allowed, IPv6 extension headers are not)."""
    cdef int gso_type = hdr[1] & ~VNET_GSO_ECN
    cdef int version = (pkt[0] >> 4) if n > 0 else 0
    cdef Py_ssize_t start, offset, payload
    cdef uint8_t proto
    cdef uint16_t value
    plan.gso_type = gso_type
    plan.segments = 1
    if (version != 4 or n < 20) and (version != 6 or n < 40):
        return 0 if gso_type == VNET_GSO_NONE else -1  # the common checks give the precise verdict
    plan.ihl = (pkt[0] & 0x0F) * 4 if version == 4 else 40
    proto = pkt[9] if version == 4 else pkt[6]
    if gso_type == VNET_GSO_NONE:
        if hdr[0] & VNET_F_NEEDS_CSUM:
            start = le16(hdr + 6)
            offset = le16(hdr + 8)
            if start + offset + 2 > n:
                return -1
            # The field holds the pseudo-header sum; the sum over csum_start.. completes it.
            value = <uint16_t>(~sum16(pkt + start, n - start) & 0xFFFF)
            put_be16(pkt + start + offset, 0xFFFF if value == 0 and proto == 17 else value)
        return 0
    if plan.ihl < 20 or plan.ihl + 8 > n:
        return -1
    if ((gso_type == VNET_GSO_TCPV4 and version == 4) or (gso_type == VNET_GSO_TCPV6 and version == 6)) \
            and proto == 6 and plan.ihl + 20 <= n:
        plan.hlen = plan.ihl + (pkt[plan.ihl + 12] >> 4) * 4
        if plan.hlen < plan.ihl + 20:
            return -1
    elif gso_type == VNET_GSO_UDP_L4 and proto == 17:
        plan.hlen = plan.ihl + 8
    else:
        return -1
    plan.mss = le16(hdr + 4)
    payload = n - plan.hlen
    if plan.mss <= 0 or payload <= 0 or plan.hlen > n:
        return -1
    plan.segments = <int>((payload + plan.mss - 1) // plan.mss)
    return 0


cdef inline Py_ssize_t build_segment_header(const uint8_t* pkt, Py_ssize_t n, const GsoPlan* plan, int i,
                                            uint8_t* hdr, Py_ssize_t* payload_offset) noexcept nogil:
    """The headers (plan.hlen bytes, into hdr) of segment i of a planned super-packet, checksums complete; its payload
    stays where it is, at pkt + payload_offset, so the segment can be sent from two pieces without copying.
    Returns the payload length."""
    cdef Py_ssize_t offset = plan.hlen + <Py_ssize_t>i * plan.mss
    cdef Py_ssize_t payload = plan.mss if n - offset > plan.mss else n - offset
    cdef Py_ssize_t total = plan.hlen + payload
    cdef uint8_t* l4 = hdr + plan.ihl
    memcpy(hdr, pkt, plan.hlen)
    if (pkt[0] >> 4) == 6:
        put_be16(hdr + 4, <uint16_t>(total - 40))  # IPv6: the payload length; no ID, no header checksum
    else:
        put_be16(hdr + 2, <uint16_t>total)
        put_be16(hdr + 4, <uint16_t>(be16(pkt + 4) + i))  # each segment its own IP ID, as the kernel's GSO does
        set_ipv4_checksum(hdr, plan.ihl)
    if plan.gso_type != VNET_GSO_UDP_L4:
        put_be32(l4 + 4, be32(pkt + plan.ihl + 4) + <uint32_t>(i * plan.mss))
        if i + 1 < plan.segments:
            l4[13] &= ~(TCP_FIN | TCP_PSH)  # only the last segment may end or push the stream
        if i > 0:
            l4[13] &= ~TCP_CWR  # congestion-window-reduced is said once, on the first segment
        set_l4_checksum_parts(hdr, plan.ihl, plan.hlen, pkt + offset, payload, 6, 16)
    else:
        put_be16(l4 + 4, <uint16_t>(total - plan.ihl))
        set_l4_checksum_parts(hdr, plan.ihl, plan.hlen, pkt + offset, payload, 17, 6)
    payload_offset[0] = offset
    return payload


cdef inline Py_ssize_t build_segment(const uint8_t* pkt, Py_ssize_t n, const GsoPlan* plan, int i,
                                     uint8_t* out) noexcept nogil:
    """Segment i of a planned super-packet into out, in one piece; returns its length."""
    cdef Py_ssize_t offset
    cdef Py_ssize_t payload = build_segment_header(pkt, n, plan, i, out, &offset)
    memcpy(out + plan.hlen, pkt + offset, payload)
    return plan.hlen + payload


cdef struct Coalescer:
    # One TCP flow being glued; iov[0] is the virtio header, iov[1] the first packet, then the later payloads.
    int count            # segments held; 0 = nothing pending
    uint8_t* first       # the first packet (headers rewritten at flush)
    Py_ssize_t ihl
    Py_ssize_t hlen
    Py_ssize_t mss       # payload of the first segment: every later one but the last must match it
    Py_ssize_t total     # IP length of the glued packet
    uint32_t next_seq
    bint closed          # a shorter segment or a PSH ended the run
    uint8_t flags        # TCP flags to put on the glued packet (PSH of the last segment)


cdef inline Py_ssize_t gluable_ip_header(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """The IP header length of a TCP packet that may be glued: 20 for IPv4 without options or fragment bits, 40 for
    IPv6 without extension headers; 0 for anything else."""
    if n >= 40 and p[0] == 0x45 and p[9] == 6 and (be16(p + 6) & 0x3FFF) == 0:
        return 20
    if n >= 60 and (p[0] >> 4) == 6 and p[6] == 6:
        return 40
    return 0


cdef inline bint tcp_segment_can_start(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """A TCP packet (IPv4 or IPv6, see gluable_ip_header) with payload and flags ACK or ACK|PSH."""
    cdef Py_ssize_t ihl = gluable_ip_header(p, n), hlen
    if ihl == 0:
        return False
    hlen = ihl + (p[ihl + 12] >> 4) * 4
    if hlen < ihl + 20 or hlen >= n:
        return False
    return (p[ihl + 13] & ~TCP_PSH) == TCP_ACK


cdef inline bint tcp_segment_continues(const Coalescer* c, const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef const uint8_t* f = c.first
    cdef Py_ssize_t payload = n - c.hlen, ihl = c.ihl
    if c.count == 0 or c.closed or c.count >= COALESCE_MAX_SEGMENTS or not tcp_segment_can_start(p, n):
        return False
    if gluable_ip_header(p, n) != ihl or ihl + (p[ihl + 12] >> 4) * 4 != c.hlen or payload > c.mss \
            or c.total + payload > IP_MAX_LENGTH:
        return False
    if ihl == 20:
        # ToS, DF, TTL, protocol, addresses and ports, then ACK number must be the same.
        if p[1] != f[1] or (p[6] & 0x40) != (f[6] & 0x40) or p[8] != f[8]:
            return False
        if memcmp(p + 12, f + 12, 12) != 0 or memcmp(p + 28, f + 28, 4) != 0:
            return False
    else:
        # Traffic class and flow label, hop limit, addresses and ports, then ACK number.
        if memcmp(p, f, 4) != 0 or p[7] != f[7] or memcmp(p + 8, f + 8, 36) != 0 or memcmp(p + 48, f + 48, 4) != 0:
            return False
    if c.hlen > ihl + 20 and memcmp(p + ihl + 20, f + ihl + 20, c.hlen - ihl - 20) != 0:
        return False  # TCP options
    return be32(p + ihl + 4) == c.next_seq


cdef inline void coalescer_start(Coalescer* c, uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t ihl = gluable_ip_header(p, n)
    c.count = 1
    c.first = p
    c.ihl = ihl
    c.hlen = ihl + (p[ihl + 12] >> 4) * 4
    c.mss = n - c.hlen
    c.total = n
    c.next_seq = be32(p + ihl + 4) + <uint32_t>c.mss
    c.flags = p[ihl + 13]
    c.closed = (p[ihl + 13] & TCP_PSH) != 0


cdef inline void coalescer_append(Coalescer* c, const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t payload = n - c.hlen
    c.count += 1
    c.total += payload
    c.next_seq += <uint32_t>payload
    c.flags |= p[c.ihl + 13] & TCP_PSH
    c.closed = payload < c.mss or (p[c.ihl + 13] & TCP_PSH) != 0


cdef inline void coalescer_finish(Coalescer* c, uint8_t* vnet) noexcept nogil:
    """Rewrite the first packet's headers for the glued length and fill the virtio header for the TUN write.

    The TCP checksum field gets only the pseudo-header sum and NEEDS_CSUM asks the kernel to finish it (it becomes
    CHECKSUM_PARTIAL), as a NIC with TSO would; the outer UDP checksum has already guarded every byte."""
    cdef uint8_t* f = c.first
    cdef int i
    for i in range(VNET_HDR_LEN):
        vnet[i] = 0
    if c.count == 1:
        return  # a lone segment goes as it came, its checksums complete
    if c.ihl == 40:
        put_be16(f + 4, <uint16_t>(c.total - 40))
    else:
        put_be16(f + 2, <uint16_t>c.total)
        set_ipv4_checksum(f, c.ihl)
    f[c.ihl + 13] = c.flags
    put_be16(f + c.ihl + 16, <uint16_t>pseudo_header_sum(f, 6, <uint32_t>(c.total - c.ihl)))
    vnet[0] = VNET_F_NEEDS_CSUM
    vnet[1] = VNET_GSO_TCPV6 if c.ihl == 40 else VNET_GSO_TCPV4
    put_le16(vnet + 2, <uint16_t>c.hlen)
    put_le16(vnet + 4, <uint16_t>c.mss)
    put_le16(vnet + 6, <uint16_t>c.ihl)
    put_le16(vnet + 8, 16)
