# cython: language_level=3
"""Python face of the per-packet logic in packet.pxd, for the capture mode's verdicts and for tests and fuzzing.

The pump calls the same inline functions; nothing here is on the packet path."""
import ipaddress

from _fastpath.routes cimport RouteTable

VERDICT_NAMES = (
    "ok", "short", "not_ipv4", "bad_header", "bad_length", "bad_checksum", "ttl_expired", "no_route", "unknown_peer",
    "spoofed_source", "not_local", "truncated", "send_failed", "tun_write_failed", "bad_offload",
)
assert len(VERDICT_NAMES) == V_COUNT


def _network(subnet):
    net = ipaddress.IPv4Network(subnet)
    return <uint32_t>int(net.network_address), <uint32_t>int(net.netmask)


def inbound_verdict(const unsigned char[:] packet, sender, RouteTable routes, own_subnet, bint protect=True):
    """What the pump does with this UDP payload from `sender`: "ok" or the drop reason."""
    cdef uint32_t own_net, own_mask
    own_net, own_mask = _network(own_subnet)
    cdef int32_t peer
    cdef const unsigned char* p = &packet[0] if packet.shape[0] else <const unsigned char*>b""
    return VERDICT_NAMES[classify_inbound(p, packet.shape[0], int(ipaddress.IPv4Address(sender)), routes,
                                          own_net, own_mask, protect, &peer)]


def outbound_verdict(const unsigned char[:] packet, RouteTable routes):
    """What the pump does with this packet read from the TUN: "ok" or the drop reason."""
    cdef const unsigned char* p = &packet[0] if packet.shape[0] else <const unsigned char*>b""
    cdef int verdict = check_ipv4(p, packet.shape[0])
    if verdict != V_OK:
        return VERDICT_NAMES[verdict]
    if routes.lookup(be32(p + 16)) < 0:
        return VERDICT_NAMES[V_NO_ROUTE]
    if p[8] <= 1:
        return VERDICT_NAMES[V_TTL_EXPIRED]
    return "ok"


def with_ttl_decremented(const unsigned char[:] packet):
    """A copy with TTL - 1 and the checksum patched; None if the TTL is too low to forward."""
    if packet.shape[0] < 20:
        raise ValueError("not an IPv4 header")
    out = bytearray(packet)
    cdef unsigned char[:] view = out
    if decrement_ttl(&view[0]) != V_OK:
        return None
    return bytes(out)


def net_unreachable(const unsigned char[:] offender, own_address):
    """The ICMP net-unreachable the pump writes back for this unroutable packet; None when suppressed."""
    if offender.shape[0] < 20:
        raise ValueError("not an IPv4 header")
    cdef unsigned char out[96]
    cdef Py_ssize_t n = build_net_unreachable(&offender[0], offender.shape[0], int(ipaddress.IPv4Address(own_address)), out)
    return None if n == 0 else bytes(out[:n])
