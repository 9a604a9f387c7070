# cython: language_level=3
"""Python face of the per-packet logic in packet.pxd, for the capture mode's verdicts and for tests and fuzzing.

The pump calls the same inline functions; nothing here is on the packet path."""
import ipaddress

from _fastpath.routes cimport RouteTable

VERDICT_NAMES = (
    "ok", "short", "not_ipv4", "bad_header", "bad_length", "bad_checksum", "ttl_expired", "no_route", "unknown_peer",
    "spoofed_source", "not_local", "truncated", "send_failed", "tun_write_failed", "bad_offload", "not_unicast",
    "not_ipv6",
)
assert len(VERDICT_NAMES) == V_COUNT


cdef OwnSubnets own_subnets(own_subnet, own_subnet6=None) except *:
    """The pump's view of this node's subnets (and TUN addresses: each subnet's network address, as upstream).
    own_subnet None: an IPv6-only node, which carries nothing but IPv6."""
    cdef OwnSubnets own
    cdef int i
    memset(&own, 0, sizeof(own))
    if own_subnet is None and own_subnet6 is None:
        raise ValueError("a node needs a subnet of at least one family")
    if own_subnet is not None:
        net = ipaddress.IPv4Network(str(own_subnet))
        own.has4 = True
        own.net4 = int(net.network_address)
        own.mask4 = int(net.netmask)
        own.addr4 = own.net4
    if own_subnet6 is not None:
        net6 = ipaddress.IPv6Network(str(own_subnet6))
        own.has6 = True
        own.net6_hi, own.net6_lo = int(net6.network_address) >> 64, int(net6.network_address) & 0xFFFFFFFFFFFFFFFF
        own.mask6_hi, own.mask6_lo = int(net6.netmask) >> 64, int(net6.netmask) & 0xFFFFFFFFFFFFFFFF
        for i in range(16):
            own.addr6[i] = net6.network_address.packed[i]
    return own


cdef int32_t peer_of(RouteTable routes, sender) except -2:
    """The peer index of an underlay address of either family, -1 if no route uses it."""
    ip = ipaddress.ip_address(str(sender))
    cdef bytes packed = ip.packed
    if ip.version == 4:
        return routes.find_peer(int(ip))
    return routes.find_peer6(packed)


def inbound_verdict(const unsigned char[:] packet, sender, RouteTable routes, own_subnet, bint protect=True,
                    own_subnet6=None):
    """What the pump does with this UDP payload from `sender` (an IPv4 or IPv6 underlay address): "ok" or the drop
    reason. own_subnet6: the node's IPv6 subnet when it carries IPv6."""
    cdef OwnSubnets own = own_subnets(own_subnet, own_subnet6)
    cdef int32_t peer = peer_of(routes, sender)
    cdef const unsigned char* p = &packet[0] if packet.shape[0] else <const unsigned char*>b""
    return VERDICT_NAMES[classify_inbound(p, packet.shape[0], peer, routes, &own, protect)]


def outbound_verdict(const unsigned char[:] packet, RouteTable routes, bint ipv6=False, bint ipv4=True):
    """What the pump does with this packet read from the TUN: "ok" or the drop reason. ipv6: the node carries IPv6;
    ipv4 false: only IPv6 (an IPv6-only network)."""
    cdef OwnSubnets own = own_subnets("0.0.0.0/32" if ipv4 else None, "::/128" if ipv6 or not ipv4 else None)
    cdef const unsigned char* p = &packet[0] if packet.shape[0] else <const unsigned char*>b""
    cdef int32_t peer
    return VERDICT_NAMES[classify_outbound(p, packet.shape[0], routes, &own, False, &peer)]


def with_ttl_decremented(const unsigned char[:] packet):
    """A copy with TTL (IPv6: hop limit) - 1 and the IPv4 checksum patched; None if too low to forward."""
    if packet.shape[0] < 20:
        raise ValueError("not an IP header")
    out = bytearray(packet)
    cdef unsigned char[:] view = out
    if decrement_hops(&view[0]) != V_OK:
        return None
    return bytes(out)


def net_unreachable(const unsigned char[:] offender, own_address):
    """The ICMP net-unreachable the pump writes back for this unroutable packet; None when suppressed."""
    if offender.shape[0] < 20:
        raise ValueError("not an IPv4 header")
    cdef unsigned char out[96]
    cdef uint32_t source = int(ipaddress.IPv4Address(own_address))
    cdef Py_ssize_t n = build_net_unreachable(&offender[0], offender.shape[0], source, out)
    return None if n == 0 else bytes(out[:n])


def no_route6(const unsigned char[:] offender, own_address6):
    """The ICMPv6 no-route the pump writes back for this unroutable IPv6 packet; None when suppressed."""
    if offender.shape[0] < 40:
        raise ValueError("not an IPv6 header")
    cdef unsigned char out[ICMP6_ERROR_MAX]
    cdef bytes source = ipaddress.IPv6Address(own_address6).packed
    cdef Py_ssize_t n = build_no_route6(&offender[0], offender.shape[0], source, out)
    return None if n == 0 else bytes(out[:n])
