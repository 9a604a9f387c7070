from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "<netinet/in.h>" nogil:
    ctypedef uint32_t in_addr_t
    cdef struct in_addr:
        in_addr_t s_addr
    cdef struct sockaddr_in:
        unsigned short sin_family
        uint16_t sin_port
        in_addr sin_addr
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)
    int AF_INET

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t* mutex, void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* mutex)
    int pthread_mutex_lock(pthread_mutex_t* mutex)
    int pthread_mutex_unlock(pthread_mutex_t* mutex)

# One open-addressing table (linear probing, tombstones) serves both maps: routes and peers.
cdef struct Slot:
    uint64_t key
    int32_t value
    uint8_t state  # 0 empty, 1 used, 2 deleted

cdef struct HashMap:
    Slot* slots
    uint32_t capacity  # a power of two
    uint32_t used
    uint32_t deleted

cdef struct Peer:
    uint32_t ip  # host byte order
    int32_t refs  # routes pointing here; 0 = free slot
    sockaddr_in addr  # ready for sendmmsg
    uint64_t tx_packets
    uint64_t tx_bytes
    uint64_t rx_packets
    uint64_t rx_bytes

cdef class RouteTable:
    # The pump's thread holds it for a whole batch (lookups and sends use peer slots); lease events take it for each
    # change. The packet path never needs the GIL, so a lease event can never stall it for longer than one change.
    cdef pthread_mutex_t mutex
    cdef HashMap route_map  # (prefix length << 32 | network) -> peer index
    cdef HashMap peer_by_ip  # ip -> peer index
    cdef Peer* peers
    cdef int32_t peer_capacity
    cdef int32_t route_count
    cdef int32_t per_length[33]
    cdef int32_t lengths[33]  # prefix lengths in use, longest first
    cdef int32_t nlengths

    cdef inline void lock(self) noexcept nogil:
        pthread_mutex_lock(&self.mutex)
    cdef inline void unlock(self) noexcept nogil:
        pthread_mutex_unlock(&self.mutex)
    cdef int32_t lookup(self, uint32_t addr) noexcept nogil
    cdef int32_t find_peer(self, uint32_t ip) noexcept nogil
    cdef void _recount_lengths(self) noexcept
    cdef int _set(self, uint64_t key, int plen, uint32_t ip, int port) except -1
    cdef int32_t _peer_ref(self, uint32_t ip, uint16_t port) except -1
    cdef void _peer_unref(self, int32_t index) noexcept
