"""WireGuard's handshake (Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s) and its cookie messages, as the WireGuard paper
specifies them (section 5.4): building and opening initiations, responses and cookie replies, and the transport keys
a finished handshake yields. Pure functions over bytes and small state objects; no sockets, no clocks but the
TAI64N timestamp. The per-packet transport path is in C (_fastpath/wg.pyx).

Message layouts (little-endian integers):
  initiation (148): type 1, 3 zero bytes, sender index, ephemeral (32), static (32+16), timestamp (12+16), mac1, mac2
  response (92):    type 2, 3 zero bytes, sender index, receiver index, ephemeral (32), empty (0+16), mac1, mac2
  cookie reply (64): type 3, 3 zero bytes, receiver index, nonce (24), cookie (16+16)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

INITIATION, RESPONSE, COOKIE_REPLY, TRANSPORT = 1, 2, 3, 4
INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE = 148, 92, 64
TRANSPORT_HEADER_SIZE, TAG_SIZE = 16, 16
KEY_SIZE = 32

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
ZERO_NONCE = bytes(12)


class HandshakeError(Exception):
    """A handshake message that does not open: wrong key, tampered, replayed, or not for us."""


def blake2s(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2s with a 16-byte digest (MAC in the paper)."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf(chaining_key: bytes, data: bytes, n: int) -> list[bytes]:
    """HKDF over HMAC-BLAKE2s: n (1..3) 32-byte outputs."""
    prk = hmac_blake2s(chaining_key, data)
    out, previous = [], b""
    for i in range(1, n + 1):
        previous = hmac_blake2s(prk, previous + bytes([i]))
        out.append(previous)
    return out


def aead_seal(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(bytes(4) + counter.to_bytes(8, "little"), plaintext, aad)


def aead_open(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(bytes(4) + counter.to_bytes(8, "little"), ciphertext, aad)
    except InvalidTag:
        raise HandshakeError("authentication failed") from None


def _rotl(v: int, n: int) -> int:
    return ((v << n) & 0xFFFFFFFF) | (v >> (32 - n))


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """The subkey of XChaCha20 (draft-irtf-cfrg-xchacha): 20 ChaCha rounds without the final addition."""
    s = list(struct.unpack("<4I", b"expand 32-byte k")) + list(struct.unpack("<8I", key))
    s += list(struct.unpack("<4I", nonce16))

    def quarter(a: int, b: int, c: int, d: int) -> None:
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF
        s[d] = _rotl(s[d] ^ s[a], 16)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF
        s[b] = _rotl(s[b] ^ s[c], 12)
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF
        s[d] = _rotl(s[d] ^ s[a], 8)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF
        s[b] = _rotl(s[b] ^ s[c], 7)

    columns_then_diagonals = (
        (0, 4, 8, 12),
        (1, 5, 9, 13),
        (2, 6, 10, 14),
        (3, 7, 11, 15),
        (0, 5, 10, 15),
        (1, 6, 11, 12),
        (2, 7, 8, 13),
        (3, 4, 9, 14),
    )
    for _ in range(10):
        for a, b, c, d in columns_then_diagonals:
            quarter(a, b, c, d)
    return struct.pack("<8I", *(s[0:4] + s[12:16]))


def xaead_seal(key: bytes, nonce24: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(hchacha20(key, nonce24[:16])).encrypt(bytes(4) + nonce24[16:], plaintext, aad)


def xaead_open(key: bytes, nonce24: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(hchacha20(key, nonce24[:16])).decrypt(bytes(4) + nonce24[16:], ciphertext, aad)
    except InvalidTag:
        raise HandshakeError("cookie authentication failed") from None


def tai64n(now: float | None = None) -> bytes:
    now = time.time() if now is None else now
    seconds = int(now)
    return struct.pack(">QI", 0x400000000000000A + seconds, int((now - seconds) * 1e9))


def dh(private: X25519PrivateKey, public: bytes) -> bytes:
    return private.exchange(X25519PublicKey.from_public_bytes(public))


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


INITIAL_CHAIN = blake2s(CONSTRUCTION)
INITIAL_HASH = blake2s(INITIAL_CHAIN, IDENTIFIER)


@dataclass
class Keys:
    """The transport keys of one finished handshake, from this side's point of view."""

    send: bytes = field(repr=False)
    receive: bytes = field(repr=False)
    local_index: int
    remote_index: int
    initiator: bool


@dataclass
class Identity:
    """This node's static key pair, with what every handshake addressed to it precomputes."""

    private: X25519PrivateKey = field(repr=False)
    public: bytes = b""
    mac1_key: bytes = b""  # HASH(LABEL_MAC1 || our public key): peers' mac1 on messages to us
    cookie_key: bytes = b""  # HASH(LABEL_COOKIE || our public key): seals the cookies we hand out

    def __post_init__(self) -> None:
        self.public = public_bytes(self.private)
        self.mac1_key = blake2s(LABEL_MAC1, self.public)
        self.cookie_key = blake2s(LABEL_COOKIE, self.public)


@dataclass
class PendingInitiation:
    """What an initiator keeps between sending an initiation and opening its response."""

    local_index: int
    ephemeral: X25519PrivateKey = field(repr=False)
    chain: bytes = field(repr=False)
    hash: bytes = field(repr=False)
    mac1: bytes = b""  # of the initiation sent: a cookie reply is sealed to it


@dataclass
class Initiation:
    """An opened initiation: who sent it, and what the responder needs to answer."""

    sender_index: int
    peer_public: bytes
    timestamp: bytes
    ephemeral_public: bytes = field(repr=False)
    chain: bytes = field(repr=False)
    hash: bytes = field(repr=False)


def stamp_macs(msg: bytearray, mac1_key: bytes, cookie: bytes | None) -> bytes:
    """Fill the last 32 bytes of a handshake message: mac1 under the receiver's key, mac2 under a fresh cookie (or
    zeros). Returns mac1."""
    end = len(msg)
    msg[end - 32 : end - 16] = mac(mac1_key, bytes(msg[: end - 32]))
    msg[end - 16 :] = mac(cookie, bytes(msg[: end - 16])) if cookie else bytes(16)
    return bytes(msg[end - 32 : end - 16])


def mac1_valid(msg: bytes, mac1_key: bytes) -> bool:
    end = len(msg)
    return hmac.compare_digest(mac(mac1_key, msg[: end - 32]), msg[end - 32 : end - 16])


def mac2_valid(msg: bytes, cookie: bytes) -> bool:
    end = len(msg)
    return hmac.compare_digest(mac(cookie, msg[: end - 16]), msg[end - 16 :])


def create_initiation(
    me: Identity, peer_public: bytes, static_static: bytes, local_index: int, cookie: bytes | None
) -> tuple[bytes, PendingInitiation]:
    chain, h = INITIAL_CHAIN, blake2s(INITIAL_HASH, peer_public)
    ephemeral = X25519PrivateKey.generate()
    e_pub = public_bytes(ephemeral)
    (chain,) = kdf(chain, e_pub, 1)
    h = blake2s(h, e_pub)
    chain, key = kdf(chain, dh(ephemeral, peer_public), 2)
    static = aead_seal(key, 0, me.public, h)
    h = blake2s(h, static)
    chain, key = kdf(chain, static_static, 2)
    timestamp = aead_seal(key, 0, tai64n(), h)
    h = blake2s(h, timestamp)
    msg = bytearray(struct.pack("<II", INITIATION, local_index) + e_pub + static + timestamp + bytes(32))
    mac1 = stamp_macs(msg, blake2s(LABEL_MAC1, peer_public), cookie)
    return bytes(msg), PendingInitiation(local_index, ephemeral, chain, h, mac1)


def open_initiation(me: Identity, msg: bytes, static_static_of) -> Initiation:
    """Open an initiation addressed to `me` (mac1 already checked). static_static_of(peer public) gives the
    precomputed DH of our static key with that peer's, or None for a key that is not a peer."""
    if len(msg) != INITIATION_SIZE or msg[0] != INITIATION:
        raise HandshakeError("not an initiation")
    (sender,) = struct.unpack_from("<I", msg, 4)
    e_pub, static, timestamp = msg[8:40], msg[40:88], msg[88:116]
    chain, h = INITIAL_CHAIN, blake2s(INITIAL_HASH, me.public)
    (chain,) = kdf(chain, e_pub, 1)
    h = blake2s(h, e_pub)
    try:
        shared = dh(me.private, e_pub)
    except ValueError:
        raise HandshakeError("invalid ephemeral key") from None
    chain, key = kdf(chain, shared, 2)
    peer_public = aead_open(key, 0, static, h)
    h = blake2s(h, static)
    static_static = static_static_of(peer_public)
    if static_static is None:
        raise HandshakeError("unknown peer key")
    chain, key = kdf(chain, static_static, 2)
    stamp = aead_open(key, 0, timestamp, h)
    h = blake2s(h, timestamp)
    return Initiation(sender, peer_public, stamp, e_pub, chain, h)


def create_response(initiation: Initiation, psk: bytes, local_index: int, cookie: bytes | None) -> tuple[bytes, Keys]:
    chain, h = initiation.chain, initiation.hash
    ephemeral = X25519PrivateKey.generate()
    e_pub = public_bytes(ephemeral)
    (chain,) = kdf(chain, e_pub, 1)
    h = blake2s(h, e_pub)
    (chain,) = kdf(chain, dh(ephemeral, initiation.ephemeral_public), 1)
    (chain,) = kdf(chain, dh(ephemeral, initiation.peer_public), 1)
    chain, tau, key = kdf(chain, psk, 3)
    h = blake2s(h, tau)
    empty = aead_seal(key, 0, b"", h)
    msg = bytearray(struct.pack("<III", RESPONSE, local_index, initiation.sender_index) + e_pub + empty + bytes(32))
    stamp_macs(msg, blake2s(LABEL_MAC1, initiation.peer_public), cookie)
    first, second = kdf(chain, b"", 2)
    return bytes(msg), Keys(
        send=second, receive=first, local_index=local_index, remote_index=initiation.sender_index, initiator=False
    )


def open_response(
    me: Identity, pending: PendingInitiation, msg: bytes, peer_public: bytes, static_static: bytes, psk: bytes
) -> Keys:
    if len(msg) != RESPONSE_SIZE or msg[0] != RESPONSE:
        raise HandshakeError("not a response")
    sender, receiver = struct.unpack_from("<II", msg, 4)
    if receiver != pending.local_index:
        raise HandshakeError("response to another initiation")
    e_pub, empty = msg[12:44], msg[44:60]
    chain, h = pending.chain, pending.hash
    (chain,) = kdf(chain, e_pub, 1)
    h = blake2s(h, e_pub)
    try:
        (chain,) = kdf(chain, dh(pending.ephemeral, e_pub), 1)
        (chain,) = kdf(chain, dh(me.private, e_pub), 1)
    except ValueError:
        raise HandshakeError("invalid ephemeral key") from None
    chain, tau, key = kdf(chain, psk, 3)
    h = blake2s(h, tau)
    aead_open(key, 0, empty, h)
    first, second = kdf(chain, b"", 2)
    return Keys(send=first, receive=second, local_index=pending.local_index, remote_index=sender, initiator=True)


class CookieChecker:
    """The responder's side of the cookie mechanism: a secret renewed every two minutes, the cookie of a source
    address, and the cookie reply sealed to the mac1 of the message it answers."""

    def __init__(self, me: Identity, lifetime: float = 120.0) -> None:
        self.me = me
        self.lifetime = lifetime
        self._secret = os.urandom(32)
        self._born = time.monotonic()

    def cookie_for(self, source: bytes) -> bytes:
        if time.monotonic() - self._born > self.lifetime:
            self._secret, self._born = os.urandom(32), time.monotonic()
        return mac(self._secret, source)

    def mac2_valid(self, msg: bytes, source: bytes) -> bool:
        return mac2_valid(msg, self.cookie_for(source))

    def reply(self, msg: bytes, source: bytes) -> bytes:
        (sender,) = struct.unpack_from("<I", msg, 4)
        nonce = os.urandom(24)
        sealed = xaead_seal(self.me.cookie_key, nonce, self.cookie_for(source), msg[-32:-16])
        return struct.pack("<II", COOKIE_REPLY, sender) + nonce + sealed


def open_cookie_reply(msg: bytes, peer_public: bytes, sent_mac1: bytes) -> bytes:
    """The cookie a peer under load handed us, to put in the mac2 of our next handshake message to it."""
    if len(msg) != COOKIE_REPLY_SIZE or msg[0] != COOKIE_REPLY:
        raise HandshakeError("not a cookie reply")
    return xaead_open(blake2s(LABEL_COOKIE, peer_public), msg[8:32], msg[32:64], sent_mac1)
