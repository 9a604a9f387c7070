# cython: language_level=3
"""The wireguard backend's data plane: WireGuard transport messages between a TUN and a UDP socket, sealed and
opened with ChaCha20-Poly1305 (libcrypto's, aead.h) in a thread that never takes the GIL.

Same shape as the udp pump (pump.pyx), from the same parts: the TUN side with its offloads (a TSO super-packet is cut
into segments, received TCP segments are glued back), the UDP side with GSO runs and GRO splits, the route table
(which here is also the allowed-IPs table: a lease's subnets name its peer). What differs is the middle:

TUN -> UDP: check and route the packet, take the peer's current keypair (none usable: drop, count W_NO_SESSION and
ask the control plane for a handshake), seal each packet or segment into a slot of its own (header, ciphertext
padded to 16 bytes, tag), send the batch. Equal-size segments for one peer seal to equal-size datagrams, so GSO
still sends a run as one message.
UDP -> TUN: a transport message names its keypair by receiver index (the slot is the index's low bits); it is
checked for age, opened in place, checked against the replay window (after authentication, so a forgery cannot
move the window), and its inner source must lie in the sending peer's allowed IPs. Handshake messages (types 1-3)
are copied into a small ring for the control plane (flannel_udp/wireguard/device.py), which answers them in Python.

Keypairs live in WgState, shared between the pump and the control plane: the control plane installs them under the
route table's write lock; the pumps read them under its read lock, and one of them promotes a responder's "next"
keypair to current when the first message arrives on it (a handshake's keys change with no gap in traffic). A device
may have several pumps, each with its TUN queue and its socket of a SO_REUSEPORT group on the port: what they share
is taken atomically (message counters, the promotion, held-packet slots) or under a short spinlock (a keypair's
replay window, the handshake ring).
"""
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp, memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport write

from _fastpath.aead cimport *
from _fastpath.clib cimport *
from _fastpath.loop cimport PacketLoop
from _fastpath.offload cimport *
from _fastpath.packet cimport *
from _fastpath.routes cimport Peer
from _fastpath.tun cimport TunSide, deliver
from _fastpath.udp cimport BUF_SIZE, GRO_BATCH, UdpSide, queue

import ipaddress
import os

from _fastpath.packet import VERDICT_NAMES

cdef extern from *:
    """
    static inline uint64_t wg_fetch_add(uint64_t *p, uint64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
    static inline uint32_t wg_load(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void wg_store(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline uint32_t wg_exchange(uint32_t *p, uint32_t v) { return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL); }
    static inline int wg_claim(uint32_t *p, uint32_t from, uint32_t to) {
        return __atomic_compare_exchange_n(p, &from, to, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    static inline int wg_claim_slot(int32_t *p, int32_t from, int32_t to) {
        return __atomic_compare_exchange_n(p, &from, to, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    static inline uint32_t wg_next(uint32_t *p) { return __atomic_fetch_add(p, 1, __ATOMIC_RELAXED); }
    static inline void wg_lock(uint32_t *l) {
        while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE))
            while (__atomic_load_n(l, __ATOMIC_RELAXED)) { }
    }
    static inline void wg_unlock(uint32_t *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }
    """
    uint64_t wg_fetch_add(uint64_t* p, uint64_t v) nogil
    uint32_t wg_load(const uint32_t* p) nogil
    void wg_store(uint32_t* p, uint32_t v) nogil
    uint32_t wg_exchange(uint32_t* p, uint32_t v) nogil
    bint wg_claim(uint32_t* p, uint32_t expected, uint32_t desired) nogil
    bint wg_claim_slot(int32_t* p, int32_t expected, int32_t desired) nogil
    uint32_t wg_next(uint32_t* p) nogil
    void wg_lock(uint32_t* l) nogil
    void wg_unlock(uint32_t* l) nogil

# The protocol's limits (the WireGuard paper, section 6).
REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120
REJECT_AFTER_TIME = 180
STAGED_LIFETIME_NS = 10 * 1000000000  # a held packet older than this is stale: TCP has resent it by then

WG_VERDICT_NAMES = ("ok", "short", "unknown_type", "unknown_index", "expired", "bad_auth", "replay", "not_allowed",
                    "bad_inner", "no_session", "control_full", "too_big")
assert len(WG_VERDICT_NAMES) == W_COUNT

cdef inline uint64_t monotonic_ns() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return <uint64_t>now.tv_sec * 1000000000 + <uint64_t>now.tv_nsec


cdef inline uint32_t le32(const uint8_t* p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint64_t le64(const uint8_t* p) noexcept nogil:
    return <uint64_t>le32(p) | (<uint64_t>le32(p + 4) << 32)


cdef inline void put_le64(uint8_t* p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = (v >> (8 * i)) & 0xFF


cdef inline bint same_endpoint(const Peer* peer, const sockaddr_in6* source) noexcept nogil:
    cdef const sockaddr_in* source4 = <const sockaddr_in*>source
    if source.sin6_family == AF_INET:
        return (peer.family == 4 and peer.addr4.sin_addr.s_addr == source4.sin_addr.s_addr
                and peer.addr4.sin_port == source4.sin_port)
    return (peer.family == 6 and peer.addr6.sin6_port == source.sin6_port
            and memcmp(peer.addr6.sin6_addr.s6_addr, source.sin6_addr.s6_addr, 16) == 0)


cdef inline const uint8_t* key_unless_loaded(Cipher* c, const Keypair* kp, const uint8_t* key) noexcept nogil:
    """The key to give libcrypto, or NULL when the context holds it already: loading a key costs as much as sealing
    a small packet, and consecutive packets mostly share their keypair."""
    if c.serial == kp.serial:
        return NULL
    c.serial = kp.serial
    return key


cdef Py_ssize_t seal(Cipher* c, uint8_t* out, const Keypair* kp, uint64_t counter, const uint8_t* a, int a_len,
                     const uint8_t* b, int b_len, int mtu) noexcept nogil:
    """A transport message into out: header, the plaintext a + b padded with zeros to 16 bytes but never beyond the
    device's MTU (a full-size packet would otherwise outgrow the underlay's: the overhead leaves no room for padding),
    sealed, and its tag. Returns its length, or -1 if libcrypto failed."""
    cdef uint8_t nonce[12]
    cdef int pad = (-(a_len + b_len)) & 15
    if mtu > 0 and a_len + b_len + pad > mtu:
        pad = mtu - a_len - b_len if mtu > a_len + b_len else 0
    cdef uint8_t* p = out + WG_HEADER
    out[0] = 4
    out[1] = out[2] = out[3] = 0
    out[4] = kp.remote_index & 0xFF
    out[5] = (kp.remote_index >> 8) & 0xFF
    out[6] = (kp.remote_index >> 16) & 0xFF
    out[7] = (kp.remote_index >> 24) & 0xFF
    put_le64(out + 8, counter)
    memset(nonce, 0, 4)
    put_le64(nonce + 4, counter)
    # The plaintext is laid out in place first and sealed in one call: libcrypto's ChaCha20 takes a slow path for
    # each short input, and a header, a payload and a pad sealed apart would be three of them.
    if a_len:
        memcpy(p, a, a_len)
    if b_len:
        memcpy(p + a_len, b, b_len)
    if pad:
        memset(p + a_len + b_len, 0, pad)
    if not aead_seal(&c.aead, key_unless_loaded(c, kp, kp.send_key), nonce, p, a_len + b_len + pad,
                     p + a_len + b_len + pad):
        c.serial = 0
        return -1
    return WG_HEADER + a_len + b_len + pad + WG_TAG


cdef bint open_in_place(Cipher* c, uint8_t* data, int length, uint8_t* tag, const Keypair* kp,
                        uint64_t counter) noexcept nogil:
    cdef uint8_t nonce[12]
    memset(nonce, 0, 4)
    put_le64(nonce + 4, counter)
    if aead_open(&c.aead, key_unless_loaded(c, kp, kp.recv_key), nonce, data, length, tag):
        return True
    c.serial = 0  # a failure may have left the context without the key: load it again next time
    return False


cdef bint replay_accept(Keypair* kp, uint64_t counter) noexcept nogil:
    """The sliding window of RFC 6479: true the first time a counter within the window is seen."""
    cdef uint64_t block = counter >> 6, top = kp.replay_top >> 6, gap, i
    cdef uint64_t bit = (<uint64_t>1) << (counter & 63)
    if counter > kp.replay_top:
        gap = block - top
        if gap > REPLAY_WORDS:
            gap = REPLAY_WORDS
        for i in range(1, gap + 1):
            kp.replay[(top + i) & (REPLAY_WORDS - 1)] = 0
        kp.replay_top = counter
    elif kp.replay_top - counter > (REPLAY_WORDS - 1) * 64:
        return False
    if kp.replay[block & (REPLAY_WORDS - 1)] & bit:
        return False
    kp.replay[block & (REPLAY_WORDS - 1)] |= bit
    return True


cdef int new_cipher(Cipher* c, bint encrypting) except -1:
    c.serial = 0
    if aead_new(&c.aead, encrypting) != 0:
        raise RuntimeError("libcrypto has no ChaCha20-Poly1305")
    return 0


cdef endpoint_of(const sockaddr_in6* source):
    """A datagram's source as (ipaddress address, port)."""
    if source.sin6_family == AF_INET:
        address = ipaddress.IPv4Address(bytes((<uint8_t*>&(<sockaddr_in*>source).sin_addr)[:4]))
        return address, ntohs((<sockaddr_in*>source).sin_port)
    return ipaddress.IPv6Address(bytes(source.sin6_addr.s6_addr[:16])), ntohs(source.sin6_port)


cdef class WgState:
    """Keypairs and per-peer session state of one WireGuard device, shared by its pump and its control plane. Peers
    are the route table's peers (a lease's endpoint), by the same index."""

    def __cinit__(self, RouteTable routes, int notify_fd=-1):
        self.routes = routes
        self.notify_fd = notify_fd
        self.keypairs = <Keypair*>calloc(KEYPAIR_SLOTS, sizeof(Keypair))
        self.peer_capacity = 0
        self.peers = NULL
        if self.keypairs == NULL:
            raise MemoryError()
        self.rekey_after_ns = REKEY_AFTER_TIME * 1000000000
        self.reject_after_ns = REJECT_AFTER_TIME * 1000000000
        self.rekey_after_messages = REKEY_AFTER_MESSAGES
        self.reject_after_messages = REJECT_AFTER_MESSAGES
        self.mtu = 0
        self.staged = <Staged*>calloc(STAGE_SLOTS, sizeof(Staged))
        if self.staged == NULL:
            raise MemoryError()
        new_cipher(&self.cipher, True)

    def __dealloc__(self):
        free(self.staged)
        if self.keypairs != NULL:
            memset(self.keypairs, 0, KEYPAIR_SLOTS * sizeof(Keypair))  # no key outlives the device in memory
        free(self.keypairs)
        free(self.peers)
        aead_free(&self.cipher.aead)

    cdef WgPeer* peer(self, int32_t index) noexcept nogil:
        if index < 0 or index >= self.peer_capacity:
            return NULL
        return &self.peers[index]

    cdef void want(self, WgPeer* p, uint32_t why) noexcept nogil:
        if wg_load(&p.wanted) < why:
            wg_store(&p.wanted, why)
            self.notify()

    cdef void notify(self) noexcept nogil:
        cdef uint64_t one = 1
        if self.notify_fd >= 0:
            write(self.notify_fd, &one, sizeof(one))

    cdef bint stage(self, int32_t peer, const uint8_t* a, Py_ssize_t a_len, const uint8_t* b, Py_ssize_t b_len,
                    uint64_t now) noexcept nogil:
        """Hold a packet (a + b) for a peer whose handshake runs: a free slot, else the next held one gives way."""
        cdef Staged* s
        cdef uint32_t state
        cdef int _
        if a_len + b_len > STAGE_MAX:
            return False
        for _ in range(STAGE_SLOTS):
            s = &self.staged[wg_next(&self.stage_next) & (STAGE_SLOTS - 1)]
            state = wg_load(&s.state)
            if (state == 0 or state == 2) and wg_claim(&s.state, state, 1):
                memcpy(s.data, a, a_len)
                if b_len:
                    memcpy(s.data + a_len, b, b_len)
                s.length = <uint32_t>(a_len + b_len)
                s.peer = peer
                s.born_ns = now
                wg_store(&s.state, 2)
                return True
        return False

    cdef bint post(self, const uint8_t* data, Py_ssize_t length, const sockaddr_in6* source) noexcept nogil:
        cdef uint32_t head, tail
        cdef uint64_t one = 1
        cdef CtlMessage* m
        if length > CTL_MAX:
            return False
        wg_lock(&self.ctl_lock)
        head, tail = self.ctl_head, wg_load(&self.ctl_tail)
        if head - tail >= CTL_SLOTS:
            wg_unlock(&self.ctl_lock)
            return False
        m = &self.ctl[head & (CTL_SLOTS - 1)]
        memcpy(m.data, data, length)
        m.length = <uint32_t>length
        memcpy(&m.source, source, sizeof(sockaddr_in6))
        wg_store(&self.ctl_head, head + 1)
        wg_unlock(&self.ctl_lock)
        if head == tail and self.notify_fd >= 0:
            write(self.notify_fd, &one, sizeof(one))
        return True

    cdef void _forget(self, int32_t slot) noexcept nogil:
        if slot >= 0:
            memset(&self.keypairs[slot], 0, sizeof(Keypair))

    # -- the control plane's face (Python, under the GIL; changes under the route table's write lock) -----------
    def take_messages(self):
        """The handshake messages the pump queued: [(bytes, (address, port))]."""
        out = []
        cdef uint32_t tail = self.ctl_tail, head = wg_load(&self.ctl_head)
        cdef CtlMessage* m
        while tail != head:
            m = &self.ctl[tail & (CTL_SLOTS - 1)]
            out.append((bytes(m.data[: m.length]), endpoint_of(&m.source)))
            tail += 1
        wg_store(&self.ctl_tail, tail)
        return out

    def take_wanted(self):
        """The peers the data path asked a handshake for since the last call (or since session()): [index]. A scan in
        C: the control plane never walks every peer in Python on a notice."""
        out = []
        cdef int32_t index
        for index in range(self.peer_capacity):
            if wg_load(&self.peers[index].wanted) != WANT_NONE and wg_exchange(&self.peers[index].wanted, WANT_NONE):
                out.append(index)
        return out

    def take_roamed(self):
        """The peers whose authenticated messages came from a new endpoint: [(index, (address, port))]. A peer stays
        flagged (and is not reported again) until settle_roamed(index)."""
        out = []
        cdef int32_t index
        cdef WgPeer* p
        for index in range(self.peer_capacity):
            p = &self.peers[index]
            if wg_load(&p.roamed) == 1:
                wg_store(&p.roamed, 2)
                out.append((index, endpoint_of(&p.seen)))
        return out

    def move_endpoint(self, int32_t index, address, int port):
        """Send to peer `index` at this endpoint from now on (it roamed); False if it is another peer's address."""
        return self.routes.move_peer(index, address, port)

    def settle_roamed(self, int32_t index):
        """The endpoint move is done (or refused for good): report the next one."""
        cdef WgPeer* p = self.peer(index)
        if p != NULL:
            wg_store(&p.roamed, 0)

    def attach(self, int32_t index):
        """Make room for the route table's peer `index` (a new lease's endpoint), with no session yet."""
        cdef WgPeer* grown
        cdef int32_t i, capacity = max(64, self.peer_capacity)
        while capacity <= index:
            capacity *= 2
        with nogil:
            self.routes.lock_for_change()
        try:
            if capacity > self.peer_capacity:
                grown = <WgPeer*>realloc(self.peers, capacity * sizeof(WgPeer))
                if grown == NULL:
                    raise MemoryError()
                self.peers = grown
                for i in range(self.peer_capacity, capacity):
                    memset(&self.peers[i], 0, sizeof(WgPeer))
                    self.peers[i].current = self.peers[i].previous = self.peers[i].next = -1
                self.peer_capacity = capacity
        finally:
            self.routes.unlock()

    def reset_peer(self, int32_t index):
        """Forget every keypair of a peer (its lease is gone, or its key changed)."""
        cdef WgPeer* p = self.peer(index)
        if p == NULL:
            return
        with nogil:
            self.routes.lock_for_change()
            self._forget(p.current)
            self._forget(p.previous)
            self._forget(p.next)
            memset(p, 0, sizeof(WgPeer))
            p.current = p.previous = p.next = -1
            self.routes.unlock()

    def reserve_index(self):
        """A fresh receiver index for a handshake in progress: random, its low bits a free keypair slot."""
        cdef uint32_t index, slot
        for _ in range(64):
            index = int.from_bytes(os.urandom(4), "little")
            slot = index & (KEYPAIR_SLOTS - 1)
            if self.keypairs[slot].state == 0:
                self.keypairs[slot].state = 1
                self.keypairs[slot].local_index = index
                return index
        raise RuntimeError("no free WireGuard session slot")

    def release_index(self, uint32_t index):
        """Give back a reserved index whose handshake did not finish."""
        cdef Keypair* kp = &self.keypairs[index & (KEYPAIR_SLOTS - 1)]
        if kp.state == 1 and kp.local_index == index:
            kp.state = 0

    def install(self, int32_t index, uint32_t local_index, uint32_t remote_index, const uint8_t[:] send_key,
                const uint8_t[:] recv_key, bint initiator):
        """The keypair of a finished handshake with peer `index`. An initiator sends with it at once; a responder keeps
        it as next until the initiator's first message on it arrives."""
        cdef WgPeer* p = self.peer(index)
        cdef int32_t slot = local_index & (KEYPAIR_SLOTS - 1)
        cdef Keypair* kp = &self.keypairs[slot]
        if p == NULL or kp.state != 1 or kp.local_index != local_index:
            raise ValueError("no handshake in progress with that index")
        if send_key.shape[0] != 32 or recv_key.shape[0] != 32:
            raise ValueError("keys are 32 bytes")
        with nogil:
            self.routes.lock_for_change()
            memset(kp, 0, sizeof(Keypair))
            memcpy(kp.send_key, &send_key[0], 32)
            memcpy(kp.recv_key, &recv_key[0], 32)
            kp.local_index = local_index
            kp.remote_index = remote_index
            kp.birth_ns = monotonic_ns()
            kp.peer = index
            kp.initiator = initiator
            self.serials += 1
            kp.serial = self.serials
            kp.state = 2
            if initiator:
                self._forget(p.next)
                p.next = -1
                self._forget(p.previous)
                p.previous = p.current
                p.current = slot
            else:
                self._forget(p.next)
                p.next = slot
            self.routes.unlock()

    def session(self, int32_t index):
        """(now, last sent, last data sent, last received, last data received) in monotonic ns, the current keypair as
        (age ns, initiator, messages sent) or None, whether a next keypair waits, and what the data path asked for
        since the last call (WANT_*)."""
        cdef WgPeer* p = self.peer(index)
        if p == NULL:
            return None
        cdef Keypair* kp
        current = None
        if p.current >= 0:
            kp = &self.keypairs[p.current]
            current = (monotonic_ns() - kp.birth_ns, bool(kp.initiator), kp.send_counter)
        return ((monotonic_ns(), p.last_sent_ns, p.last_data_sent_ns, p.last_received_ns, p.last_data_received_ns),
                current, p.next >= 0, wg_exchange(&p.wanted, WANT_NONE))

    def release_held(self):
        """The held packets whose peer now has a current keypair, sealed: [(peer index, datagram)]. Packets held too
        long are let go."""
        out = []
        cdef uint8_t* sealed = <uint8_t*>calloc(1, STAGE_MAX + WG_HEADER + WG_TAG + 16)
        cdef Staged* s
        cdef WgPeer* p
        cdef Keypair* kp
        cdef Py_ssize_t n
        cdef uint64_t now = monotonic_ns()
        cdef int i
        if sealed == NULL:
            raise MemoryError()
        try:
            with nogil:
                self.routes.lock()
            try:
                for i in range(STAGE_SLOTS):
                    s = &self.staged[i]
                    if not wg_claim(&s.state, 2, 3):
                        continue
                    p = self.peer(s.peer)
                    kp = &self.keypairs[p.current] if p != NULL and p.current >= 0 else NULL
                    if kp != NULL and kp.state == 2 and now - kp.birth_ns < self.reject_after_ns:
                        n = seal(&self.cipher, sealed, kp, wg_fetch_add(&kp.send_counter, 1), s.data, s.length, NULL, 0,
                                 self.mtu)
                        if n > 0:
                            p.last_sent_ns = p.last_data_sent_ns = now
                            out.append((s.peer, bytes(sealed[:n])))
                        wg_store(&s.state, 0)
                    elif now - s.born_ns > STAGED_LIFETIME_NS or p == NULL:
                        wg_store(&s.state, 0)
                    else:
                        wg_store(&s.state, 2)
            finally:
                self.routes.unlock()
        finally:
            free(sealed)
        return out

    def keepalive(self, int32_t index):
        """A keepalive (an empty transport message) on the current keypair, or None without one."""
        cdef WgPeer* p = self.peer(index)
        cdef uint8_t out[WG_HEADER + WG_TAG]
        cdef Py_ssize_t n = -1
        cdef Keypair* kp
        if p == NULL:
            return None
        with nogil:
            self.routes.lock()  # the pump may promote a keypair meanwhile
            if p.current >= 0 and self.keypairs[p.current].state == 2:
                kp = &self.keypairs[p.current]
                n = seal(&self.cipher, out, kp, wg_fetch_add(&kp.send_counter, 1), NULL, 0, NULL, 0, 0)
                if n > 0:
                    p.last_sent_ns = monotonic_ns()
            self.routes.unlock()
        return bytes(out[:n]) if n > 0 else None


cdef class WgPump(PacketLoop):
    def __cinit__(self, int tun_fd, int sock_fd, RouteTable routes, WgState wg, own_subnet, bint gso=False,
                  bint gro=False, bint vnet_hdr=False, int sock6_fd=-1, own_subnet6=None, int notify_fd=-1):
        self.tun = TunSide(tun_fd, vnet_hdr)
        self.udp = UdpSide(sock_fd, sock6_fd, gso, gro, notify_fd)
        self.routes = routes
        self.wg = wg
        self.own = own_subnets(own_subnet, own_subnet6)
        self.read_buf = <uint8_t*>calloc(1, BUF_SIZE)
        self.enc_bufs = <uint8_t*>calloc(BATCH, BUF_SIZE)
        if self.read_buf == NULL or self.enc_bufs == NULL:
            raise MemoryError()
        new_cipher(&self.sealer, True)
        new_cipher(&self.opener, False)

    def __dealloc__(self):
        free(self.read_buf)
        free(self.enc_bufs)
        aead_free(&self.sealer.aead)
        aead_free(&self.opener.aead)

    # -- TUN -> UDP --------------------------------------------------------------------------------------------------
    cdef void _tun_round(self) noexcept nogil:
        cdef int handled = 0, n = 0, verdict, i
        cdef Py_ssize_t r, length, payload, offset
        cdef int32_t peer
        cdef uint8_t* pkt
        cdef WgPeer* p
        cdef Keypair* kp
        self.now = monotonic_ns()
        self.routes.lock()
        while handled < BATCH:
            r = self.tun.read(self.read_buf, BUF_SIZE)
            if r < 0:
                break
            self.tun_read_packets += 1
            pkt = self.read_buf
            length = r
            self.plan.gso_type = VNET_GSO_NONE
            self.plan.segments = 1
            if self.tun.vnet_hdr:
                pkt = self.read_buf + VNET_HDR_LEN
                length = r - VNET_HDR_LEN
                if length < 0 or plan_gso(self.read_buf, pkt, length, &self.plan) < 0:
                    self.drops_out[V_BAD_OFFLOAD] += 1
                    handled += 1
                    continue
            handled += self.plan.segments
            # A WireGuard device routes, it does not forward: the hop limit is the kernel's business, not ours.
            verdict = classify_outbound(pkt, length, self.routes, &self.own, self.plan.gso_type != VNET_GSO_NONE,
                                        &peer)
            if verdict == V_TTL_EXPIRED:
                verdict = V_OK
            if verdict != V_OK:
                self.drops_out[verdict] += self.plan.segments
                continue
            p = self.wg.peer(peer)
            kp = &self.wg.keypairs[p.current] if p != NULL and p.current >= 0 else NULL
            if (kp == NULL or kp.state != 2 or self.now - kp.birth_ns >= self.wg.reject_after_ns
                    or kp.send_counter >= self.wg.reject_after_messages):
                if p != NULL:
                    self._hold(peer, pkt, length)
                    self.wg.want(p, WANT_SESSION)
                else:
                    self.wg_drops_out[W_NO_SESSION] += self.plan.segments
                continue
            if kp.initiator and (self.now - kp.birth_ns >= self.wg.rekey_after_ns
                                 or kp.send_counter >= self.wg.rekey_after_messages):
                self.wg.want(p, WANT_REKEY)
            p.last_sent_ns = p.last_data_sent_ns = self.now
            if self.plan.gso_type == VNET_GSO_NONE:
                n = self._seal(n, pkt, length, NULL, 0, peer, kp)
                continue
            self.tso_reads += 1
            self.tso_segments += self.plan.segments
            for i in range(self.plan.segments):
                payload = build_segment_header(pkt, length, &self.plan, i, self.hdr, &offset)
                n = self._seal(n, self.hdr, self.plan.hlen, pkt + offset, payload, peer, kp)
        if n > 0:
            self.udp.send(n, self.routes)
        self.routes.unlock()

    cdef void _hold(self, int32_t peer, uint8_t* pkt, Py_ssize_t length) noexcept nogil:
        """Hold the packet (each segment of a super-packet) until the handshake it waits for has finished."""
        cdef int i
        cdef Py_ssize_t payload, offset
        if self.plan.gso_type == VNET_GSO_NONE:
            if self.wg.stage(peer, pkt, length, NULL, 0, self.now):
                self.held += 1
            else:
                self.wg_drops_out[W_NO_SESSION] += 1
            return
        for i in range(self.plan.segments):
            payload = build_segment_header(pkt, length, &self.plan, i, self.hdr, &offset)
            if self.wg.stage(peer, self.hdr, self.plan.hlen, pkt + offset, payload, self.now):
                self.held += 1
            else:
                self.wg_drops_out[W_NO_SESSION] += 1

    cdef int _seal(self, int n, const uint8_t* head, Py_ssize_t head_len, const uint8_t* payload,
                   Py_ssize_t payload_len, int32_t peer, Keypair* kp) noexcept nogil:
        """Seal one packet (headers + payload) into slot n and queue it; sends the batch when the slots are full.
        Returns the next free slot."""
        cdef uint8_t* out = self.enc_bufs + <size_t>n * BUF_SIZE
        cdef Py_ssize_t sealed
        if head_len + payload_len + 15 + WG_HEADER + WG_TAG > BUF_SIZE:
            self.wg_drops_out[W_TOO_BIG] += 1
            return n
        sealed = seal(&self.sealer, out, kp, wg_fetch_add(&kp.send_counter, 1), head, <int>head_len, payload,
                      <int>payload_len, self.wg.mtu)
        if sealed < 0:
            self.drops_out[V_SEND_FAILED] += 1
            return n
        if not queue(self.udp, n, out, sealed, NULL, 0, peer):
            return n + 1
        self.udp.send(BATCH, self.routes)
        return 0

    # -- UDP -> TUN --------------------------------------------------------------------------------------------------
    cdef void _socket_round(self, int fd, bint v6) noexcept nogil:
        cdef int n, i
        cdef uint8_t* buf
        cdef Py_ssize_t length, offset, seg, piece
        cdef uint64_t start = self.udp_received_packets
        cdef int want = GRO_BATCH if self.udp.gro else BATCH
        self.now = monotonic_ns()
        self.routes.lock()
        while self.udp_received_packets - start < BATCH:
            n = self.udp.receive(fd, v6)
            if n <= 0:
                break
            for i in range(n):
                buf = self.udp.received(i)
                if buf == NULL:
                    self.udp_received_packets += 1
                    self.wg_drops_in[W_TOO_BIG] += 1
                    continue
                length = self.udp.rx_msgs[i].msg_len
                seg = self.udp.gro_size(i)
                if seg == 0:
                    self._receive(buf, length, i)
                    continue
                offset = 0
                while offset < length:
                    piece = seg if length - offset > seg else length - offset
                    self._receive(buf + offset, piece, i)
                    offset += piece
            self.tun.flush()
            if n < want:
                break
        self.routes.unlock()

    cdef void _receive(self, uint8_t* buf, Py_ssize_t length, int i) noexcept nogil:
        self.udp_received_packets += 1
        if length < 4:
            self.wg_drops_in[W_SHORT] += 1
            return
        if buf[1] | buf[2] | buf[3] or buf[0] < 1 or buf[0] > 4:
            self.wg_drops_in[W_UNKNOWN_TYPE] += 1
            return
        if buf[0] == 4:
            self._transport(buf, length, i)
            return
        if length != (148 if buf[0] == 1 else 92 if buf[0] == 2 else 64):
            self.wg_drops_in[W_SHORT] += 1
        elif not self.wg.post(buf, length, &self.udp.rx_addr[i]):
            self.wg_drops_in[W_CONTROL_FULL] += 1
        else:
            self.handshake_messages += 1  # handed to the control plane

    cdef void _transport(self, uint8_t* buf, Py_ssize_t length, int i) noexcept nogil:
        cdef bint accepted
        cdef uint32_t index
        cdef int32_t slot, source_peer
        cdef uint64_t counter
        cdef Py_ssize_t size, total
        cdef Keypair* kp
        cdef WgPeer* p
        cdef uint8_t* inner = buf + WG_HEADER
        if length < WG_HEADER + WG_TAG:
            self.wg_drops_in[W_SHORT] += 1
            return
        index = le32(buf + 4)
        slot = index & (KEYPAIR_SLOTS - 1)
        kp = &self.wg.keypairs[slot]
        if kp.state != 2 or kp.local_index != index:
            self.wg_drops_in[W_UNKNOWN_INDEX] += 1
            return
        counter = le64(buf + 8)
        if counter >= self.wg.reject_after_messages or self.now - kp.birth_ns >= self.wg.reject_after_ns:
            self.wg_drops_in[W_EXPIRED] += 1
            return
        size = length - WG_HEADER - WG_TAG
        if not open_in_place(&self.opener, inner, <int>size, buf + length - WG_TAG, kp, counter):
            self.wg_drops_in[W_BAD_AUTH] += 1
            return
        wg_lock(&kp.replay_lock)
        accepted = replay_accept(kp, counter)
        wg_unlock(&kp.replay_lock)
        if not accepted:
            self.wg_drops_in[W_REPLAY] += 1
            return
        p = self.wg.peer(kp.peer)
        if p == NULL:
            self.wg_drops_in[W_UNKNOWN_INDEX] += 1
            return
        p.last_received_ns = self.now
        if (not same_endpoint(&self.routes.peers[kp.peer], &self.udp.rx_addr[i]) and wg_load(&p.roamed) == 0
                and wg_claim(&p.roamed, 0, 3)):
            # Authenticated, and from elsewhere: the peer roamed (a new address, a NAT's new mapping). The control
            # plane moves its endpoint; until then replies still go to the old one.
            memcpy(&p.seen, &self.udp.rx_addr[i], sizeof(sockaddr_in6))
            wg_store(&p.roamed, 1)
            self.wg.notify()
        if p.next == slot and wg_claim_slot(&p.next, slot, -1):
            # The initiator used the new keys: they become current, the old ones previous (one pump does it).
            self.wg._forget(p.previous)
            p.previous = p.current
            p.current = slot
            self.wg.notify()  # packets held for this peer can go now
        if size == 0:
            self.keepalives_received += 1
            return
        if (inner[0] >> 4) == 4 and size >= 20:
            total = be16(inner + 2)
            source_peer = self.routes.lookup(be32(inner + 12))
        elif (inner[0] >> 4) == 6 and size >= 40:
            total = 40 + be16(inner + 4)
            source_peer = self.routes.lookup6(inner + 8)
        else:
            self.wg_drops_in[W_BAD_INNER] += 1
            return
        if total > size or total < 20:
            self.wg_drops_in[W_BAD_INNER] += 1
            return
        if source_peer != kp.peer:
            self.wg_drops_in[W_NOT_ALLOWED] += 1
            return
        p.last_data_received_ns = self.now
        counter_add(&self.routes.peers[kp.peer].rx_packets, 1)
        counter_add(&self.routes.peers[kp.peer].rx_bytes, total)
        deliver(self.tun, inner, total)

    def counters(self):
        """Totals and drops by reason and direction, for /metrics and tests."""
        drops_out = {VERDICT_NAMES[i]: self.drops_out[i] for i in range(1, V_COUNT) if self.drops_out[i]}
        drops_out.update({WG_VERDICT_NAMES[i]: self.wg_drops_out[i] for i in range(1, W_COUNT) if self.wg_drops_out[i]})
        drops_in = {WG_VERDICT_NAMES[i]: self.wg_drops_in[i] for i in range(1, W_COUNT) if self.wg_drops_in[i]}
        counters = self.side_counters(drops_out, drops_in)
        counters.update(keepalives_received=self.keepalives_received, held_packets=self.held,
                        handshake_messages=self.handshake_messages)
        return counters
