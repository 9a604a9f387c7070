"""The fuzz targets' oracle for IPv4: written from RFC 791/793/768 here, independent of the code under test."""

from __future__ import annotations

import ipaddress
import struct


def fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return fold(sum(struct.unpack(f"!{len(data) // 2}H", data)))


def check_header(packet: bytes, what: str) -> int:
    """A complete, self-consistent IPv4 packet; returns its header length."""
    assert len(packet) >= 20, f"{what}: {len(packet)} bytes"
    assert packet[0] >> 4 == 4, f"{what}: version {packet[0] >> 4}"
    ihl = (packet[0] & 0x0F) * 4
    assert 20 <= ihl <= len(packet), f"{what}: IHL {ihl}"
    total = struct.unpack("!H", packet[2:4])[0]
    assert total == len(packet), f"{what}: total length {total} for {len(packet)} bytes"
    assert ones_sum(packet[:ihl]) == 0xFFFF, f"{what}: header checksum"
    return ihl


def check_l4_checksum(packet: bytes, ihl: int, what: str) -> None:
    """The TCP or UDP checksum over the pseudo-header is right (UDP's 0 means none)."""
    proto = packet[9]
    l4 = packet[ihl:]
    if proto == 17 and len(l4) >= 8 and l4[6:8] == b"\0\0":
        return
    pseudo = packet[12:20] + struct.pack("!BBH", 0, proto, len(l4))
    assert ones_sum(pseudo + l4) == 0xFFFF, f"{what}: L4 checksum (protocol {proto})"


def within(address: bytes, network: str) -> bool:
    return ipaddress.IPv4Address(address) in ipaddress.IPv4Network(network)
