from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t

from _fastpath.clib cimport (
    pthread_rwlock_rdlock,
    pthread_rwlock_t,
    pthread_rwlock_unlock,
    pthread_rwlock_wrlock,
    sockaddr_in,
    sockaddr_in6,
)


# A key of either family: an IPv4 address or prefix in lo (hi 0), an IPv6 one in hi (first 8 bytes) and lo (last 8),
# big-endian; tag = family << 8 | prefix length (255 for a peer's address), so the families never meet.
cdef struct Key:
    uint64_t hi
    uint64_t lo
    uint32_t tag

# One open-addressing table (linear probing, tombstones) serves both maps: routes and peers.
cdef struct Slot:
    Key key
    int32_t value
    uint8_t state  # 0 empty, 1 used, 2 deleted

cdef struct HashMap:
    Slot* slots
    uint32_t capacity  # a power of two
    uint32_t used
    uint32_t deleted

cdef struct Peer:
    Key ip  # the underlay address, as a peer key
    int family  # 4 or 6: which socket sends to it, and which address below is filled in
    int32_t refs  # routes pointing here; 0 = free slot
    sockaddr_in addr4  # ready for sendmmsg
    sockaddr_in6 addr6
    uint64_t tx_packets  # added to by every packet thread: counter_add / counter_read only
    uint64_t tx_bytes
    uint64_t rx_packets
    uint64_t rx_bytes


cdef inline uint64_t be64(const uint8_t* p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v


cdef class RouteTable:
    # A readers-writer lock: each packet thread holds it for reading for a round (lookups and sends use peer slots),
    # so the pumps never wait for one another, and lets go while a full socket makes it wait; lease events take it for
    # writing for each change, ahead of readers still to come (writer preference), so a change waits for no more than
    # the rounds in progress. The packet path never needs the GIL.
    cdef pthread_rwlock_t rwlock
    cdef uint64_t generation  # counts changes: a holder that let go of the mutex knows whether peers may have moved
    cdef HashMap route_map  # prefix key -> peer index
    cdef HashMap peer_by_ip  # address key -> peer index
    cdef Peer* peers
    cdef int32_t peer_capacity
    cdef int32_t route_count
    cdef int32_t per_length4[33]
    cdef int32_t lengths4[33]  # IPv4 prefix lengths in use, longest first
    cdef int32_t nlengths4
    cdef int32_t per_length6[129]
    cdef int32_t lengths6[129]
    cdef int32_t nlengths6

    cdef inline void lock(self) noexcept nogil:
        pthread_rwlock_rdlock(&self.rwlock)
    cdef inline void lock_for_change(self) noexcept nogil:
        pthread_rwlock_wrlock(&self.rwlock)
    cdef inline void unlock(self) noexcept nogil:
        pthread_rwlock_unlock(&self.rwlock)
    cdef int32_t lookup(self, uint32_t addr) noexcept nogil
    cdef int32_t lookup6(self, const uint8_t* addr) noexcept nogil
    cdef int32_t find_peer(self, uint32_t ip) noexcept nogil
    cdef int32_t find_peer6(self, const uint8_t* ip) noexcept nogil
    cdef void _recount_lengths(self) noexcept
    cdef int _set(self, Key key, Key ip, int family, int port) except -1
    cdef int32_t _peer_ref(self, Key ip, int family, uint16_t port) except -1
    cdef void _peer_unref(self, int32_t index) noexcept
    cdef int port_of(self, int32_t index) noexcept
