"""Micro-benchmarks of the fast path's per-packet work (pytest-benchmark). Each call runs the work ROUNDS times in C;
`per packet` in the extra info is the mean divided by ROUNDS.

    .venv/bin/python -m pytest bench/test_micro.py --benchmark-enable --benchmark-columns=mean,stddev,rounds

Run as plain tests (the default, --benchmark-disable) they only check that each driver does the work it measures.
"""

import ipaddress
import os
import struct

import pytest
from _fastpath.drivers import (
    bench_checksum,
    bench_inbound,
    bench_lookups,
    bench_outbound,
    bench_seal_open,
    bench_split,
    bench_ttl_update,
)
from _fastpath.offload import GSO_TCPV4, NEEDS_CSUM
from _fastpath.routes import RouteTable
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from scapy.all import IP, TCP, UDP, raw

ROUNDS = 10_000
OWN = "10.5.72.0/24"


def table_with(routes: int) -> RouteTable:
    table = RouteTable()
    network = ipaddress.ip_network("10.0.0.0/8")
    for i, subnet in enumerate(network.subnets(new_prefix=24)):
        if i == routes:
            break
        table.set_route(subnet, f"198.18.{i // 250}.{i % 250 + 1}", 8285)
    table.set_route("10.5.1.0/24", "198.18.250.1", 8285)
    return table


def per_packet(benchmark, rounds=ROUNDS):
    if benchmark.stats is not None and benchmark.stats.stats.mean:
        benchmark.extra_info["per packet (ns)"] = round(benchmark.stats.stats.mean / rounds * 1e9, 1)


@pytest.mark.parametrize("routes", [10, 1_000, 10_000])
def test_route_lookup(benchmark, routes):
    table = table_with(routes)
    addresses = b"".join(ipaddress.IPv4Address(f"10.{(i * 7) % 40}.{i % 250}.9").packed for i in range(1000))
    hits = benchmark(bench_lookups, table, addresses, 10)
    assert hits > 0
    per_packet(benchmark, 10 * 1000)


@pytest.mark.parametrize("size", [64, 1400])
def test_encapsulate(benchmark, size):
    packet = raw(IP(src="10.5.72.5", dst="10.5.1.9") / UDP() / (b"x" * (size - 28)))
    assert benchmark(bench_outbound, packet, table_with(1000), ROUNDS) == ROUNDS
    per_packet(benchmark)


@pytest.mark.parametrize("size", [64, 1400])
def test_decapsulate(benchmark, size):
    packet = raw(IP(src="10.5.1.9", dst="10.5.72.5") / UDP() / (b"x" * (size - 28)))
    assert benchmark(bench_inbound, packet, "198.18.250.1", table_with(1000), OWN, ROUNDS) == ROUNDS
    per_packet(benchmark)


def rfc1071_sum(data: bytes) -> int:
    """The folded, uncomplemented one's complement sum of big-endian 16-bit words: the oracle, done plainly."""
    total = sum(int.from_bytes(data[i : i + 2].ljust(2, b"\0"), "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_checksum_update(benchmark):
    """Each round sets the TTL back to 64 without touching the checksum, then decrements it: the checksum must have
    grown by exactly 0x0100 (the TTL word's change) per round, in one's complement (0 and 0xFFFF alike)."""
    checksum = benchmark(bench_ttl_update, ROUNDS)
    assert (checksum - ROUNDS * 0x0100) % 0xFFFF == 0
    per_packet(benchmark)


def test_full_checksum_1400_bytes(benchmark):
    data = os.urandom(1400)
    assert benchmark(bench_checksum, data, ROUNDS) == (ROUNDS * rfc1071_sum(data)) % (1 << 32)
    per_packet(benchmark)


def test_tso_split_of_a_64k_read(benchmark):
    packet = bytearray(raw(IP(src="10.5.72.5", dst="10.5.1.9") / TCP(flags="A") / (b"y" * (1432 * 45))))
    read = struct.pack("<BBHHHH", NEEDS_CSUM, GSO_TCPV4, 40, 1432, 20, 16) + bytes(packet)
    assert benchmark(bench_split, read, 100) == 45 * 100
    per_packet(benchmark, 45 * 100)  # per segment


@pytest.mark.parametrize("size", [32, 1424])
def test_wireguard_seal_and_open(benchmark, size):
    """A transport message's crypto (1424: a full 1420-byte packet padded), checked against the cryptography
    package's ChaCha20-Poly1305 with the last round's nonce."""
    key, message = os.urandom(32), os.urandom(size)
    sealed, opened = benchmark(bench_seal_open, key, message, ROUNDS)
    assert opened == ROUNDS
    assert ChaCha20Poly1305(key).decrypt(bytes(4) + struct.pack("<Q", ROUNDS - 1), sealed, None) == message
    per_packet(benchmark)
