"""The fuzz targets' oracle for IPv6: written from RFC 8200 and 2460's pseudo-header here, independent of the code
under test."""

from __future__ import annotations

import ipaddress
import struct

from .ipv4 import ones_sum


def check_header6(packet: bytes, what: str) -> None:
    """A complete IPv6 packet whose payload length matches its bytes."""
    assert len(packet) >= 40, f"{what}: {len(packet)} bytes"
    assert packet[0] >> 4 == 6, f"{what}: version {packet[0] >> 4}"
    length = struct.unpack("!H", packet[4:6])[0]
    assert 40 + length == len(packet), f"{what}: payload length {length} for {len(packet)} bytes"
    assert packet[7] > 0, f"{what}: hop limit 0"


def check_l4_checksum6(packet: bytes, what: str) -> None:
    """The TCP or UDP checksum (directly after the fixed header) over the IPv6 pseudo-header is right."""
    proto = packet[6]
    l4 = packet[40:]
    pseudo = packet[8:40] + struct.pack("!IxxxB", len(l4), proto)
    assert ones_sum(pseudo + l4) == 0xFFFF, f"{what}: L4 checksum (next header {proto})"


def within6(address: bytes, network: str) -> bool:
    return ipaddress.IPv6Address(address) in ipaddress.IPv6Network(network)
