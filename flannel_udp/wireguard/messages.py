"""WireGuard's four message types as seen from outside, without any key: what `flannel-udp capture` shows of the
wireguard backend's datagrams (who starts handshakes with whom, which session a transport message belongs to, how
much it carries), and the fuzzing target's structural oracle."""

from __future__ import annotations

import struct

from .noise import COOKIE_REPLY, COOKIE_REPLY_SIZE, INITIATION, INITIATION_SIZE, RESPONSE, RESPONSE_SIZE, TRANSPORT

NAMES = {
    INITIATION: "handshake initiation",
    RESPONSE: "handshake response",
    COOKIE_REPLY: "cookie reply",
    TRANSPORT: "transport",
}
SIZES = {INITIATION: INITIATION_SIZE, RESPONSE: RESPONSE_SIZE, COOKIE_REPLY: COOKIE_REPLY_SIZE}
TRANSPORT_MIN = 32  # header (16) and tag (16): a keepalive


def describe(payload: bytes) -> tuple[str, bool]:
    """A one-line description of a datagram's payload, and whether it is well formed."""
    if len(payload) < 4 or payload[0] not in NAMES or payload[1:4] != b"\0\0\0":
        return f"not a WireGuard message ({len(payload)} bytes)", False
    kind, name = payload[0], NAMES[payload[0]]
    if kind in SIZES and len(payload) != SIZES[kind]:
        return f"{name} of {len(payload)} bytes (a well-formed one has {SIZES[kind]})", False
    if kind == INITIATION:
        return f"{name} sender {struct.unpack_from('<I', payload, 4)[0]:#010x}", True
    if kind == RESPONSE:
        sender, receiver = struct.unpack_from("<II", payload, 4)
        return f"{name} sender {sender:#010x} receiver {receiver:#010x}", True
    if kind == COOKIE_REPLY:
        return f"{name} receiver {struct.unpack_from('<I', payload, 4)[0]:#010x}", True
    if len(payload) < TRANSPORT_MIN:
        return f"{name} of {len(payload)} bytes (at least {TRANSPORT_MIN})", False
    receiver, counter = struct.unpack_from("<IQ", payload, 4)
    sealed = len(payload) - TRANSPORT_MIN
    what = "keepalive" if sealed == 0 else f"{sealed} bytes sealed"
    return f"{name} receiver {receiver:#010x} counter {counter} {what}", True
