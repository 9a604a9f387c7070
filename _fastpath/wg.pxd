"""The wireguard backend's data plane: WireGuard transport messages (type 4) between a TUN and a UDP socket."""
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t

from _fastpath.aead cimport Aead
from _fastpath.clib cimport sockaddr_in6
from _fastpath.loop cimport PacketLoop
from _fastpath.offload cimport GsoPlan
from _fastpath.packet cimport V_COUNT
from _fastpath.routes cimport RouteTable
from _fastpath.udp cimport BATCH

cdef enum:
    KEYPAIR_SLOTS = 8192  # a power of two: a keypair's slot is the low bits of its receiver index
    REPLAY_WORDS = 64  # the replay bitmap: 4096 counters, of which the newest 4032 are told apart
    CTL_SLOTS = 64  # handshake messages waiting for the control plane
    CTL_MAX = 148  # the largest handshake message (an initiation)
    STAGE_SLOTS = 128  # packets held while their peer's handshake runs (all peers together; the oldest give way)
    STAGE_MAX = 9216  # the largest packet held (a jumbo frame's); a larger one is dropped as W_NO_SESSION
    WG_HEADER = 16  # type, receiver index, counter
    WG_TAG = 16

# Why a datagram or a packet was dropped, besides the checks of packet.pxd.
cdef enum:
    W_OK = 0
    W_SHORT = 1  # shorter than its message type allows
    W_UNKNOWN_TYPE = 2
    W_UNKNOWN_INDEX = 3  # a receiver index that names no live keypair (an unknown or forgotten session)
    W_EXPIRED = 4  # a keypair past REJECT_AFTER_TIME or REJECT_AFTER_MESSAGES
    W_BAD_AUTH = 5  # the Poly1305 tag does not match: tampered, or sealed under another key
    W_REPLAY = 6  # a counter already seen, or older than the replay window
    W_NOT_ALLOWED = 7  # decrypted inner source outside the sending peer's allowed IPs
    W_BAD_INNER = 8  # decrypted contents that are no IP packet of the length they claim
    W_NO_SESSION = 9  # a packet for a peer without a usable keypair yet: the handshake is asked for
    W_CONTROL_FULL = 10  # a handshake message while the control plane's queue was full
    W_TOO_BIG = 11  # a packet larger than a datagram can carry
    W_COUNT = 12


# What the data path asks of the control plane for a peer (WgPeer.wanted).
cdef enum:
    WANT_NONE = 0
    WANT_SESSION = 1  # no usable keypair: a packet was dropped
    WANT_REKEY = 2  # the current keypair, ours as initiator, is old: a new handshake before it expires


# A ChaCha20-Poly1305 context (aead.h) with the keypair whose key it holds (Keypair.serial; 0 for none).
cdef struct Cipher:
    Aead aead
    uint64_t serial


cdef struct Keypair:
    uint8_t send_key[32]
    uint8_t recv_key[32]
    uint32_t local_index
    uint32_t remote_index
    uint64_t send_counter  # next counter to send: taken with an atomic add (the control plane sends keepalives)
    uint64_t birth_ns
    uint64_t serial  # unique per installed keypair: whether a Cipher holds its key already
    int32_t peer
    uint8_t initiator
    uint8_t state  # 0 free, 1 reserved by a handshake in progress, 2 live
    uint32_t replay_lock  # the window below is one pump's at a time (a spinlock: held for a few instructions)
    uint64_t replay_top  # the highest counter received
    uint64_t replay[REPLAY_WORDS]


cdef struct WgPeer:
    int32_t current  # keypair slots, -1 for none
    int32_t previous
    int32_t next  # a responder's keypair, used for sending once the initiator has sent on it
    uint64_t last_sent_ns  # any transport message
    uint64_t last_data_sent_ns
    uint64_t last_received_ns
    uint64_t last_data_received_ns
    uint32_t wanted  # the data path asks for a handshake (1: none usable, 2: the current one is old)
    uint32_t roamed  # 1: an authenticated message came from `seen`, not the peer's endpoint (for the control plane);
                     # 2: reported; 3: a pump is writing `seen`
    sockaddr_in6 seen


cdef struct Staged:
    uint32_t state  # 0 free, 1 being written by the pump, 2 held, 3 being sealed by the control plane
    int32_t peer
    uint32_t length
    uint64_t born_ns
    uint8_t data[STAGE_MAX]


cdef struct CtlMessage:
    uint32_t length
    sockaddr_in6 source
    uint8_t data[CTL_MAX]


cdef class WgState:
    cdef RouteTable routes
    cdef Keypair* keypairs
    cdef WgPeer* peers
    cdef int32_t peer_capacity
    cdef public uint64_t rekey_after_ns
    cdef public uint64_t reject_after_ns
    cdef public uint64_t rekey_after_messages
    cdef uint64_t reject_after_messages
    cdef public int mtu  # the device's: padding stops there (0: pad every message to 16 bytes)
    cdef int notify_fd
    cdef CtlMessage ctl[CTL_SLOTS]
    cdef uint32_t ctl_lock  # the pumps post one at a time (handshake messages are rare)
    cdef uint32_t ctl_head  # written by the packet threads, under ctl_lock
    cdef uint32_t ctl_tail  # written by the control plane
    cdef Cipher cipher  # the control plane's, for keepalives and held packets
    cdef uint64_t serials
    cdef Staged* staged
    cdef uint32_t stage_next  # the pump's next slot to try

    cdef WgPeer* peer(self, int32_t index) noexcept nogil
    cdef void want(self, WgPeer* p, uint32_t why) noexcept nogil
    cdef void notify(self) noexcept nogil
    cdef bint stage(self, int32_t peer, const uint8_t* a, Py_ssize_t a_len, const uint8_t* b, Py_ssize_t b_len,
                    uint64_t now) noexcept nogil
    cdef bint post(self, const uint8_t* data, Py_ssize_t length, const sockaddr_in6* source) noexcept nogil
    cdef void _forget(self, int32_t slot) noexcept nogil


cdef class WgPump(PacketLoop):
    cdef WgState wg
    cdef Cipher sealer
    cdef Cipher opener
    cdef uint8_t* read_buf
    cdef uint8_t* enc_bufs  # BATCH slots: each datagram is sealed into a slot of its own
    cdef uint8_t hdr[128]
    cdef GsoPlan plan
    cdef uint64_t now
    cdef uint64_t drops_out[V_COUNT]
    cdef uint64_t wg_drops_out[W_COUNT]
    cdef uint64_t wg_drops_in[W_COUNT]
    cdef uint64_t keepalives_received, handshake_messages
    cdef uint64_t held

    cdef void _tun_round(self) noexcept nogil
    cdef void _hold(self, int32_t peer, uint8_t* pkt, Py_ssize_t length) noexcept nogil
    cdef int _seal(self, int n, const uint8_t* head, Py_ssize_t head_len, const uint8_t* payload,
                   Py_ssize_t payload_len, int32_t peer, Keypair* kp) noexcept nogil
    cdef void _socket_round(self, int fd, bint v6) noexcept nogil
    cdef void _receive(self, uint8_t* buf, Py_ssize_t length, int i) noexcept nogil
    cdef void _transport(self, uint8_t* buf, Py_ssize_t length, int i) noexcept nogil
