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


# -- micro-benchmark drivers: the per-packet work of the pump, repeated in C (no syscalls, no Python per packet) ------
def bench_outbound(const unsigned char[:] packet, RouteTable routes, int rounds):
    """TUN -> UDP work per packet: copy in (as a read would), IPv4 checks, route lookup, TTL - 1. Returns the sent."""
    cdef unsigned char scratch[65536]
    cdef Py_ssize_t n = packet.shape[0]
    cdef int r
    cdef long sent = 0
    if n > 65536 or n < 20:
        raise ValueError("packet size")
    with nogil:
        for r in range(rounds):
            memcpy(scratch, &packet[0], n)
            if check_ipv4(scratch, n) == V_OK and routes.lookup(be32(scratch + 16)) >= 0 and decrement_ttl(scratch) == V_OK:
                sent += 1
    return sent


def bench_inbound(const unsigned char[:] packet, sender, RouteTable routes, own_subnet, int rounds):
    """UDP -> TUN work per datagram: copy in, IPv4 checks, source checks against the leases, TTL - 1."""
    cdef unsigned char scratch[65536]
    cdef Py_ssize_t n = packet.shape[0]
    cdef uint32_t own_net, own_mask, source = int(ipaddress.IPv4Address(sender))
    own_net, own_mask = _network(own_subnet)
    cdef int r
    cdef int32_t peer
    cdef long accepted = 0
    if n > 65536 or n < 20:
        raise ValueError("packet size")
    with nogil:
        for r in range(rounds):
            memcpy(scratch, &packet[0], n)
            if classify_inbound(scratch, n, source, routes, own_net, own_mask, True, &peer) == V_OK \
                    and decrement_ttl(scratch) == V_OK:
                accepted += 1
    return accepted


def bench_ttl_update(int rounds):
    """The RFC 1624 incremental checksum update alone."""
    cdef unsigned char header[20]
    cdef int r
    memset(header, 0, 20)
    header[0] = 0x45
    with nogil:
        for r in range(rounds):
            header[8] = 64
            decrement_ttl(header)
    return header[10] << 8 | header[11]
