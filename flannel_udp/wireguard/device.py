"""The control plane of one WireGuard device: peers by public key, the handshakes (answered and started), cookies
under load, and the timers of the WireGuard paper (section 6), driving the keypairs of the C data path (WgState).

Runs on the daemon's event loop. The pump thread hands it handshake messages through WgState's ring and asks it for
handshakes (a packet found no usable keypair, or ours is getting old) through the notice eventfd; a tick every
TICK seconds does the rest: retransmits, keepalives, rekeys, and forgetting old keys.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import os
import random
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

from _fastpath.wg import WgState

from . import noise

log = logging.getLogger(__name__)

TICK = 0.1  # seconds between timer checks
WANT_SESSION, WANT_REKEY = 1, 2  # _fastpath/wg.pxd's WANT_*
# More handshake messages than this in one drain, or than UNDER_LOAD_PER_SECOND within a second, means a flood:
# initiations then need a valid mac2 (a cookie) for UNDER_LOAD_FOR seconds after (as wireguard-go stays under load).
UNDER_LOAD = 16
UNDER_LOAD_PER_SECOND = 64
UNDER_LOAD_FOR = 1.0
INITIATIONS_PER_SECOND = 50  # from one peer, at most: a replayed or hammered initiation costs a DH each


@dataclass(frozen=True)
class Timers:
    """The protocol's times in seconds (the WireGuard paper, section 6). Scaled down only in tests (the environment's
    FLANNEL_UDP_WG_TIME_SCALE), to see a rekey happen in seconds."""

    rekey_after: float = 120.0
    reject_after: float = 180.0
    rekey_attempt: float = 90.0
    rekey_timeout: float = 5.0
    keepalive: float = 10.0
    cookie_lifetime: float = 120.0

    @classmethod
    def from_environment(cls) -> Timers:
        """ValueError, naming the variable, for anything but a positive number."""
        text = os.environ.get("FLANNEL_UDP_WG_TIME_SCALE", "") or "1"
        try:
            scale = float(text)
        except ValueError:
            scale = 0.0
        if not 0 < scale < float("inf"):
            raise ValueError(f"FLANNEL_UDP_WG_TIME_SCALE must be a positive number, got {text!r}")
        return cls(**{f.name: getattr(cls, f.name) * scale for f in dataclasses.fields(cls)})


@dataclass
class PeerState:
    """What the control plane knows of one peer: its key, where it is, its handshake in flight and its cookie."""

    public: bytes
    index: int  # the route table's peer index, by which WgState keeps its sessions
    endpoint: tuple[str, int]
    static_static: bytes = field(repr=False)
    pending: noise.PendingInitiation | None = None
    attempt_started: float = 0.0  # when the current series of initiations began
    last_initiation_sent: float = 0.0
    cookie: bytes | None = field(default=None, repr=False)
    cookie_time: float = 0.0
    last_timestamp: bytes = b""  # of the newest initiation accepted: older or equal ones are replays
    last_initiation_received: float = 0.0
    last_handshake: float = 0.0  # wall clock, for the operator

    def fresh_cookie(self, lifetime: float) -> bytes | None:
        return self.cookie if self.cookie and time.monotonic() - self.cookie_time < lifetime else None


def where(endpoint: tuple[str, int]) -> str:
    """An endpoint as an operator writes it: 198.18.0.2:51820, [fd00::2]:51821."""
    address, port = endpoint
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def source_bytes(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bytes:
    return address.packed + struct.pack("<H", port)


class WireguardDevice:
    """Peers and handshakes of one WireGuard device (one key pair, a UDP socket per underlay family, one WgState)."""

    def __init__(
        self,
        identity: noise.Identity,
        psk: bytes,
        state: WgState,
        sockets: dict[int, socket.socket],
        persistent_keepalive: float = 0.0,
        timers: Timers | None = None,
    ) -> None:
        self.me = identity
        self.psk = psk
        self.state = state
        self.sockets = sockets  # by underlay family: handshakes leave from the socket a peer is reached on
        self.persistent_keepalive = persistent_keepalive
        self.timers = timers or Timers.from_environment()
        state.rekey_after_ns = int(self.timers.rekey_after * 1e9)
        state.reject_after_ns = int(self.timers.reject_after * 1e9)
        self.cookies = noise.CookieChecker(identity, self.timers.cookie_lifetime)
        self.peers: dict[bytes, PeerState] = {}
        self.by_index: dict[int, PeerState] = {}
        self.pending: dict[int, PeerState] = {}  # our receiver index of an initiation in flight -> its peer
        self.stats: Counter[str] = Counter()  # handshakes, keepalives, drops by reason (the control plane's)
        self._second_started, self._messages_this_second, self._under_load_until = 0.0, 0, 0.0

    # -- peers, from lease events ------------------------------------------------------------------------------------
    def set_peer(self, public: bytes, index: int, endpoint: tuple[str, int]) -> None:
        old = self.peers.get(public)
        if old is not None and old.index == index:
            old.endpoint = endpoint
            return
        if old is not None:
            self.remove_peer(public)
        other = self.by_index.get(index)
        if other is not None:  # the same endpoint under a new key: a node that was reinstalled
            self.remove_peer(other.public)
        self.state.attach(index)
        peer = PeerState(public, index, endpoint, noise.dh(self.me.private, public))
        self.peers[public] = peer
        self.by_index[index] = peer

    def remove_peer(self, public: bytes) -> None:
        peer = self.peers.pop(public, None)
        if peer is None:
            return
        self.by_index.pop(peer.index, None)
        self._drop_pending(peer)
        self.state.reset_peer(peer.index)

    def _drop_pending(self, peer: PeerState) -> None:
        if peer.pending is not None:
            self.pending.pop(peer.pending.local_index, None)
            self.state.release_index(peer.pending.local_index)
            peer.pending = None

    # -- messages from the pump --------------------------------------------------------------------------------------
    def on_notice(self) -> None:
        """Handshake messages the pump queued, then the handshakes it asked for."""
        messages = self.state.take_messages()
        under_load = self._under_load(len(messages))
        for data, (address, port) in messages:
            try:
                self._on_message(data, address, port, under_load)
            except noise.HandshakeError as e:
                self.stats[f"drop_{str(e).replace(' ', '_')}"] += 1
        for index, (address, port) in self.state.take_roamed():
            peer = self.by_index.get(index)
            if peer is not None:
                self._roam(peer, (str(address), port))
            else:
                self.state.settle_roamed(index)
        for index in self.state.take_wanted():
            peer = self.by_index.get(index)
            if peer is not None and peer.pending is None:
                self.initiate(peer)
        self._release_held()

    def _roam(self, peer: PeerState, endpoint: tuple[str, int]) -> None:
        """The peer's authenticated messages come from `endpoint` (a new address, a NAT's new mapping): everything
        for it goes there from now on, as WireGuard's roaming does."""
        if endpoint != peer.endpoint:
            if not self.state.move_endpoint(peer.index, endpoint[0], endpoint[1]):
                log.warning(
                    "WireGuard peer at %s speaks from %s, another peer's address: not followed",
                    where(peer.endpoint),
                    where(endpoint),
                )
                return  # stays flagged in the data path: not reported again until the peer is set anew
            log.info("WireGuard peer at %s moved to %s", where(peer.endpoint), where(endpoint))
            peer.endpoint = endpoint
            self.stats["endpoint_changes"] += 1
        self.state.settle_roamed(peer.index)

    def _under_load(self, drained: int) -> bool:
        """Whether handshake messages come faster than a node's peers ever send them: a burst in one drain, or too
        many within a second however the drains cut them."""
        now = time.monotonic()
        if now - self._second_started >= 1.0:
            self._second_started, self._messages_this_second = now, 0
        self._messages_this_second += drained
        if drained > UNDER_LOAD or self._messages_this_second > UNDER_LOAD_PER_SECOND:
            self._under_load_until = now + UNDER_LOAD_FOR
        return now < self._under_load_until

    def _release_held(self) -> set[int]:
        """Send the packets the pump held while their peer's handshake ran, now sealed under its new keys. Returns
        the peers (indices) that got some."""
        sent = set()
        for index, datagram in self.state.release_held():
            peer = self.by_index.get(index)
            if peer is not None:
                self._send(datagram, peer.endpoint)
                self.stats["held_packets_sent"] += 1
                sent.add(index)
        return sent

    def _on_message(self, data: bytes, address, port: int, under_load: bool) -> None:
        kind = data[0]
        if kind == noise.COOKIE_REPLY:
            (receiver,) = struct.unpack_from("<I", data, 4)
            peer = self.pending.get(receiver)
            if peer is None or peer.pending is None:
                raise noise.HandshakeError("unexpected cookie")
            peer.cookie = noise.open_cookie_reply(data, peer.public, peer.pending.mac1)
            peer.cookie_time = time.monotonic()
            self.stats["cookies_received"] += 1
            return
        if not noise.mac1_valid(data, self.me.mac1_key):
            raise noise.HandshakeError("bad mac1")
        source = source_bytes(address, port)
        if under_load and not self.cookies.mac2_valid(data, source):
            self._send(self.cookies.reply(data, source), (str(address), port))
            self.stats["cookie_replies_sent"] += 1
            return
        if kind == noise.INITIATION:
            self._on_initiation(data, (str(address), port))
        else:
            self._on_response(data, (str(address), port))

    def _on_initiation(self, data: bytes, source: tuple[str, int]) -> None:
        def static_static_of(public: bytes) -> bytes | None:
            peer = self.peers.get(public)
            return peer.static_static if peer is not None else None

        initiation = noise.open_initiation(self.me, data, static_static_of)
        peer = self.peers[initiation.peer_public]
        now = time.monotonic()
        if initiation.timestamp <= peer.last_timestamp:
            raise noise.HandshakeError("replayed initiation")
        if now - peer.last_initiation_received < 1.0 / INITIATIONS_PER_SECOND:
            raise noise.HandshakeError("initiation flood")
        peer.last_timestamp, peer.last_initiation_received = initiation.timestamp, now
        local = self.state.reserve_index()
        response, keys = noise.create_response(
            initiation, self.psk, local, peer.fresh_cookie(self.timers.cookie_lifetime)
        )
        self.state.install(peer.index, keys.local_index, keys.remote_index, keys.send, keys.receive, False)
        self._roam(peer, source)
        self._send(response, source)
        self._completed(peer, "answered")

    def _on_response(self, data: bytes, source: tuple[str, int]) -> None:
        (receiver,) = struct.unpack_from("<I", data, 8)
        peer = self.pending.get(receiver)
        if peer is None or peer.pending is None:
            raise noise.HandshakeError("unexpected response")
        keys = noise.open_response(self.me, peer.pending, data, peer.public, peer.static_static, self.psk)
        self.pending.pop(receiver)
        peer.pending = None
        self.state.install(peer.index, keys.local_index, keys.remote_index, keys.send, keys.receive, True)
        self._roam(peer, source)
        # The responder sends on the new keys only once it has received on them: a keepalive at once.
        # What waited for this handshake goes first; a keepalive if nothing did.
        if peer.index not in self._release_held():
            self._keepalive(peer)
        self._completed(peer, "initiated")

    def _completed(self, peer: PeerState, how: str) -> None:
        self.stats["handshakes_completed"] += 1
        first = peer.last_handshake == 0.0
        peer.last_handshake = time.time()
        peer.attempt_started = 0.0
        (log.info if first else log.debug)("WireGuard handshake with %s %s", where(peer.endpoint), how)

    # -- sending -----------------------------------------------------------------------------------------------------
    def initiate(self, peer: PeerState) -> None:
        now = time.monotonic()
        if now - peer.last_initiation_sent < self.timers.rekey_timeout:
            return
        self._drop_pending(peer)
        if not peer.attempt_started:
            peer.attempt_started = now
        local = self.state.reserve_index()
        msg, pending = noise.create_initiation(
            self.me, peer.public, peer.static_static, local, peer.fresh_cookie(self.timers.cookie_lifetime)
        )
        peer.pending = pending
        self.pending[local] = peer
        # A little jitter keeps two nodes that start together from initiating in lockstep forever.
        peer.last_initiation_sent = now - random.uniform(0, self.timers.rekey_timeout / 15)
        self._send(msg, peer.endpoint)
        self.stats["initiations_sent"] += 1

    def _keepalive(self, peer: PeerState) -> None:
        message = self.state.keepalive(peer.index)
        if message is not None:
            self._send(message, peer.endpoint)
            self.stats["keepalives_sent"] += 1

    def _send(self, data: bytes, endpoint: tuple[str, int]) -> None:
        sock = self.sockets.get(6 if ":" in endpoint[0] else 4)
        try:
            if sock is None:
                raise OSError(errno.EAFNOSUPPORT, "no socket of that family")
            sock.sendto(data, endpoint)
        except OSError as e:
            self.stats["send_failed"] += 1
            log.debug("Cannot send a WireGuard message to %s: %s", where(endpoint), e.strerror)

    # -- timers ------------------------------------------------------------------------------------------------------
    def tick(self) -> None:
        for peer in list(self.peers.values()):
            self._peer_timers(peer)
        self._release_held()

    def _peer_timers(self, peer: PeerState) -> None:
        t = self.timers
        session = self.state.session(peer.index)
        if session is None:
            return
        (now_ns, sent, data_sent, received, data_received), current, _, wanted = session

        def ago(stamp: int) -> float:
            return (now_ns - stamp) / 1e9 if stamp else float("inf")

        now = time.monotonic()
        if peer.pending is not None:
            if now - peer.attempt_started >= t.rekey_attempt:
                log.info("WireGuard handshake with %s gave up after %.0f s", where(peer.endpoint), t.rekey_attempt)
                self._drop_pending(peer)
                peer.attempt_started = 0.0
            elif now - peer.last_initiation_sent >= t.rekey_timeout:
                self.initiate(peer)  # retransmit
            return
        age = current[0] / 1e9 if current is not None else 0.0
        if wanted or (current is None and self.persistent_keepalive):
            self.initiate(peer)
        elif (
            current is not None
            and current[1]
            and age >= t.reject_after - t.keepalive - t.rekey_timeout
            and (ago(data_received) < t.keepalive)
        ):
            self.initiate(peer)  # ours is about to expire while the peer still talks to us
        elif ago(data_sent) < ago(received) and ago(data_sent) >= t.keepalive + t.rekey_timeout:
            self.initiate(peer)  # we sent and heard nothing back: the peer may have lost our session
        elif ago(data_received) < ago(sent) and ago(data_received) >= t.keepalive:
            self._keepalive(peer)  # the peer sent data and we had none to send: tell it we are alive
        elif self.persistent_keepalive and ago(sent) >= self.persistent_keepalive:
            self._keepalive(peer)
        if current is not None and age >= 3 * t.reject_after and ago(received) >= 3 * t.reject_after:
            self.state.reset_peer(peer.index)  # no key outlives three times its life
            self.state.attach(peer.index)
