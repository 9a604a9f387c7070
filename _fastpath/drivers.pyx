# cython: language_level=3
"""Micro-benchmark drivers (bench/test_micro.py): the per-packet work of the pump, repeated in C with no syscalls and
no Python per packet. Kept out of the data plane's own modules; nothing here runs in a node."""
import ipaddress

from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from _fastpath.aead cimport Aead, aead_free, aead_new, aead_open, aead_seal
from _fastpath.checksum cimport sum16
from _fastpath.offload cimport *
from _fastpath.packet cimport *
from _fastpath.routes cimport RouteTable


cdef int32_t peer_of(RouteTable routes, sender) except -2:
    return routes.find_peer(int(ipaddress.IPv4Address(sender)))


def bench_outbound(const unsigned char[:] packet, RouteTable routes, int rounds):
    """TUN -> UDP work per packet: copy in (as a read would), IPv4 checks, route lookup, TTL - 1. Returns the sent."""
    cdef unsigned char scratch[65536]
    cdef Py_ssize_t n = packet.shape[0]
    cdef int _round
    cdef long sent = 0
    if n > 65536 or n < 20:
        raise ValueError("packet size")
    cdef OwnSubnets own = own_subnets("0.0.0.0/32")
    cdef int32_t peer
    with nogil:
        for _round in range(rounds):
            memcpy(scratch, &packet[0], n)
            if classify_outbound(scratch, n, routes, &own, False, &peer) == V_OK and decrement_ttl(scratch) == V_OK:
                sent += 1
    return sent


def bench_inbound(const unsigned char[:] packet, sender, RouteTable routes, own_subnet, int rounds):
    """UDP -> TUN work per datagram: copy in, IPv4 checks, source checks against the leases, TTL - 1."""
    cdef unsigned char scratch[65536]
    cdef Py_ssize_t n = packet.shape[0]
    cdef OwnSubnets own = own_subnets(own_subnet)
    cdef int32_t peer = peer_of(routes, sender)
    cdef int _round
    cdef long accepted = 0
    if n > 65536 or n < 20:
        raise ValueError("packet size")
    with nogil:
        for _round in range(rounds):
            memcpy(scratch, &packet[0], n)
            if classify_inbound(scratch, n, peer, routes, &own, True) == V_OK \
                    and decrement_ttl(scratch) == V_OK:
                accepted += 1
    return accepted


def bench_ttl_update(int rounds):
    """The RFC 1624 incremental checksum update alone."""
    cdef unsigned char header[20]
    cdef int _round
    memset(header, 0, 20)
    header[0] = 0x45
    with nogil:
        for _round in range(rounds):
            header[8] = 64
            decrement_ttl(header)
    return header[10] << 8 | header[11]


def bench_split(const unsigned char[:] read, int rounds):
    """Cutting one TUN super-packet into its segments (headers, payload copy, IP and TCP checksums), repeated in C."""
    cdef unsigned char* scratch
    cdef unsigned char out[65536]
    cdef GsoPlan plan
    cdef Py_ssize_t n = read.shape[0] - VNET_HDR_LEN
    cdef int _round, i
    cdef long segments = 0
    copy = bytearray(read)
    cdef unsigned char[:] view = copy
    scratch = &view[0]
    if plan_gso(scratch, scratch + VNET_HDR_LEN, n, &plan) < 0 or plan.gso_type == VNET_GSO_NONE:
        raise ValueError("not a super-packet")
    with nogil:
        for _round in range(rounds):
            for i in range(plan.segments):
                build_segment(scratch + VNET_HDR_LEN, n, &plan, i, out)
                segments += 1
    return segments


def bench_seal_open(const unsigned char[:] key, const unsigned char[:] message, int rounds):
    """The wireguard pump's crypto per message: copy the message in, seal it in place under the next nonce (the
    counter, as a pump does), open it again. Returns (the last round's sealed message and tag, how many opened)."""
    cdef Aead sealer, opener
    cdef uint8_t nonce[12]
    cdef Py_ssize_t n = message.shape[0]
    cdef int opened = 0, _round
    if key.shape[0] != 32 or n == 0 or n > 65536 or rounds < 1:
        raise ValueError("key, message size or rounds")
    work, last = bytearray(n + 16), bytearray(n + 16)
    cdef uint8_t[:] out = work
    cdef uint8_t[:] kept = last
    memset(&sealer, 0, sizeof(Aead))  # aead_free takes an Aead that aead_new never filled
    memset(&opener, 0, sizeof(Aead))
    memset(nonce, 0, 12)
    try:
        if aead_new(&sealer, 1) != 0 or aead_new(&opener, 0) != 0:
            raise RuntimeError("libcrypto has no ChaCha20-Poly1305")
        with nogil:
            for _round in range(rounds):
                memcpy(nonce + 4, &_round, sizeof(_round))
                memcpy(&out[0], &message[0], n)
                aead_seal(&sealer, &key[0] if _round == 0 else NULL, nonce, &out[0], n, &out[n])
                if _round == rounds - 1:
                    memcpy(&kept[0], &out[0], n + 16)
                opened += aead_open(&opener, &key[0] if _round == 0 else NULL, nonce, &out[0], n, &out[n])
    finally:
        aead_free(&sealer)
        aead_free(&opener)
    return bytes(last), opened


def bench_checksum(const unsigned char[:] data, int rounds):
    cdef int _round
    cdef uint32_t total = 0
    with nogil:
        for _round in range(rounds):
            total += sum16(&data[0], data.shape[0])
    return total


def bench_lookups(RouteTable table, const unsigned char[:] addresses, int rounds=1):
    """Look up every big-endian IPv4 address in the buffer `rounds` times, in C; returns the hits (benchmarks)."""
    cdef Py_ssize_t n = addresses.shape[0] // 4, i
    cdef int _round
    cdef long hits = 0
    cdef uint32_t a
    with nogil:
        for _round in range(rounds):
            for i in range(n):
                a = ((<uint32_t>addresses[4 * i] << 24) | (<uint32_t>addresses[4 * i + 1] << 16)
                     | (<uint32_t>addresses[4 * i + 2] << 8) | addresses[4 * i + 3])
                if table.lookup(a) >= 0:
                    hits += 1
    return hits


def bench_locked_lookups(RouteTable table, const unsigned char[:] addresses, double seconds, int per_round=64):
    """As a pump does it: take the table's read lock, look up `per_round` IPv4 addresses, let go; for `seconds` of
    wall time without the GIL (so threads run in parallel). Returns (lookups, rounds)."""
    cdef Py_ssize_t n = addresses.shape[0] // 4, i = 0
    cdef long lookups = 0, rounds = 0
    cdef int _k
    cdef uint32_t a
    cdef long long deadline
    cdef timespec now
    with nogil:
        clock_gettime(CLOCK_MONOTONIC, &now)
        deadline = <long long>now.tv_sec * 1000000000 + now.tv_nsec + <long long>(seconds * 1e9)
        while True:
            table.lock()
            for _k in range(per_round):
                a = ((<uint32_t>addresses[4 * i] << 24) | (<uint32_t>addresses[4 * i + 1] << 16)
                     | (<uint32_t>addresses[4 * i + 2] << 8) | addresses[4 * i + 3])
                table.lookup(a)
                i = i + 1 if i + 1 < n else 0
            table.unlock()
            lookups += per_round
            rounds += 1
            if rounds % 64 == 0:
                clock_gettime(CLOCK_MONOTONIC, &now)
                if <long long>now.tv_sec * 1000000000 + now.tv_nsec >= deadline:
                    break
    return lookups, rounds
