# cython: language_level=3
"""Route table of the udp backend: overlay subnet (IPv4 or IPv6) -> peer (public IP of either family, port),
longest-prefix match, in C.

Upstream scans a list; here a lookup probes one hash table per prefix length in use (normally one per family: every
lease has SubnetLen / IPv6SubnetLen), so its cost does not grow with the number of routes. Per-peer counters live
beside the peer so the pump updates them without a second lookup.
"""
import ipaddress

from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

from _fastpath.clib cimport (
    AF_INET,
    AF_INET6,
    PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP,
    counter_read,
    htonl,
    htons,
    ntohs,
    pthread_rwlock_destroy,
    pthread_rwlock_init,
    pthread_rwlockattr_destroy,
    pthread_rwlockattr_init,
    pthread_rwlockattr_setkind_np,
    pthread_rwlockattr_t,
)

cdef uint32_t MIN_CAPACITY = 64
cdef uint32_t PEER_TAG = 255


cdef inline uint64_t _mix(uint64_t k) noexcept nogil:
    # splitmix64 finaliser: neighbouring subnets land far apart.
    k ^= k >> 30
    k *= <uint64_t>0xbf58476d1ce4e5b9
    k ^= k >> 27
    k *= <uint64_t>0x94d049bb133111eb
    k ^= k >> 31
    return k


cdef inline uint64_t _hash(const Key* k) noexcept nogil:
    return _mix(k.lo ^ _mix(k.hi ^ (<uint64_t>k.tag << 40)))


cdef inline bint _same(const Key* a, const Key* b) noexcept nogil:
    return a.lo == b.lo and a.hi == b.hi and a.tag == b.tag


cdef int hm_init(HashMap* m, uint32_t capacity) except -1:
    m.slots = <Slot*>calloc(capacity, sizeof(Slot))
    if m.slots == NULL:
        raise MemoryError()
    m.capacity = capacity
    m.used = 0
    m.deleted = 0
    return 0


cdef inline int32_t hm_get(const HashMap* m, const Key* key) noexcept nogil:
    cdef uint32_t mask = m.capacity - 1
    cdef uint32_t i = <uint32_t>_hash(key) & mask
    while True:
        if m.slots[i].state == 0:
            return -1
        if m.slots[i].state == 1 and _same(&m.slots[i].key, key):
            return m.slots[i].value
        i = (i + 1) & mask


cdef int hm_put(HashMap* m, Key key, int32_t value) except -1:
    cdef uint32_t mask, i
    cdef int32_t tomb = -1
    if (m.used + m.deleted + 1) * 2 > m.capacity:
        hm_rehash(m, m.capacity * 2 if (m.used + 1) * 4 > m.capacity else m.capacity)
    mask = m.capacity - 1
    i = <uint32_t>_hash(&key) & mask
    while True:
        if m.slots[i].state == 0:
            break
        if m.slots[i].state == 1 and _same(&m.slots[i].key, &key):
            m.slots[i].value = value
            return 0
        if m.slots[i].state == 2 and tomb < 0:
            tomb = i
        i = (i + 1) & mask
    if tomb >= 0:
        i = tomb
        m.deleted -= 1
    m.slots[i].key = key
    m.slots[i].value = value
    m.slots[i].state = 1
    m.used += 1
    return 0


cdef int hm_del(HashMap* m, const Key* key) noexcept:
    cdef uint32_t mask = m.capacity - 1
    cdef uint32_t i = <uint32_t>_hash(key) & mask
    while m.slots[i].state != 0:
        if m.slots[i].state == 1 and _same(&m.slots[i].key, key):
            m.slots[i].state = 2
            m.used -= 1
            m.deleted += 1
            return 1
        i = (i + 1) & mask
    return 0


cdef int hm_rehash(HashMap* m, uint32_t capacity) except -1:
    cdef HashMap fresh
    cdef uint32_t i
    hm_init(&fresh, capacity)
    for i in range(m.capacity):
        if m.slots[i].state == 1:
            hm_put(&fresh, m.slots[i].key, m.slots[i].value)
    free(m.slots)
    m[0] = fresh
    return 0


cdef inline uint64_t mask64(int plen) noexcept nogil:
    """The top plen bits of a 64-bit word (plen 0..64)."""
    cdef uint64_t ones = 0xFFFFFFFFFFFFFFFF
    return 0 if plen <= 0 else (ones if plen >= 64 else ones << (64 - plen))


cdef inline Key key4(uint32_t addr, int plen) noexcept nogil:
    cdef Key k
    k.hi = 0
    k.lo = addr & <uint32_t>(mask64(plen) >> 32)
    k.tag = (4 << 8) | plen
    return k


cdef inline Key key6(uint64_t hi, uint64_t lo, int plen) noexcept nogil:
    cdef Key k
    k.hi = hi & mask64(plen)
    k.lo = lo & mask64(plen - 64)
    k.tag = (6 << 8) | plen
    return k


def _address_key(address):
    """Key of an underlay address (a peer) and its family, from Python."""
    ip = ipaddress.ip_address(str(address))
    cdef Key k
    value = int(ip)
    k.hi = (value >> 64) & 0xFFFFFFFFFFFFFFFF
    k.lo = value & 0xFFFFFFFFFFFFFFFF
    k.tag = (ip.version << 8) | PEER_TAG
    return k, ip.version


def _prefix_key(network):
    net = ipaddress.ip_network(str(network))
    value = int(net.network_address)
    cdef Key k
    if net.version == 4:
        k = key4(<uint32_t>value, net.prefixlen)
    else:
        k = key6((value >> 64) & 0xFFFFFFFFFFFFFFFF, value & 0xFFFFFFFFFFFFFFFF, net.prefixlen)
    return k, net


def _key_network(Key k):
    plen = k.tag & 0xFF
    if k.tag >> 8 == 4:
        return ipaddress.IPv4Network((k.lo, plen))
    return ipaddress.IPv6Network(((<object>k.hi << 64) | k.lo, plen))  # in Python: a C shift by 64 loses the bits


def _key_address(Key k):
    if k.tag >> 8 == 4:
        return ipaddress.IPv4Address(k.lo)
    return ipaddress.IPv6Address((<object>k.hi << 64) | k.lo)


cdef void set_endpoint(Peer* peer, Key ip, int family, uint16_t port) noexcept:
    """A peer's underlay address, as its key and as the sockaddr sendmmsg takes."""
    cdef int i
    peer.ip = ip
    peer.family = family
    memset(&peer.addr4, 0, sizeof(peer.addr4))
    memset(&peer.addr6, 0, sizeof(peer.addr6))
    if family == 4:
        peer.addr4.sin_family = AF_INET
        peer.addr4.sin_port = htons(port)
        peer.addr4.sin_addr.s_addr = htonl(<uint32_t>ip.lo)
    else:
        peer.addr6.sin6_family = AF_INET6
        peer.addr6.sin6_port = htons(port)
        for i in range(8):
            peer.addr6.sin6_addr.s6_addr[i] = (ip.hi >> (56 - 8 * i)) & 0xFF
            peer.addr6.sin6_addr.s6_addr[8 + i] = (ip.lo >> (56 - 8 * i)) & 0xFF


cdef class RouteTable:
    def __cinit__(self):
        cdef pthread_rwlockattr_t attr
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP)
        pthread_rwlock_init(&self.rwlock, &attr)
        pthread_rwlockattr_destroy(&attr)
        hm_init(&self.route_map, MIN_CAPACITY)
        hm_init(&self.peer_by_ip, MIN_CAPACITY)
        self.peer_capacity = 16
        self.peers = <Peer*>calloc(self.peer_capacity, sizeof(Peer))
        if self.peers == NULL:
            raise MemoryError()
        self.route_count = 0
        memset(self.per_length4, 0, sizeof(self.per_length4))
        memset(self.per_length6, 0, sizeof(self.per_length6))
        self.nlengths4 = 0
        self.nlengths6 = 0

    def __dealloc__(self):
        pthread_rwlock_destroy(&self.rwlock)
        free(self.route_map.slots)
        free(self.peer_by_ip.slots)
        free(self.peers)

    cdef int32_t lookup(self, uint32_t addr) noexcept nogil:
        """Peer index for an IPv4 destination (host byte order), longest prefix first; -1 if none."""
        cdef int32_t k, found
        cdef Key key
        for k in range(self.nlengths4):
            key = key4(addr, self.lengths4[k])
            found = hm_get(&self.route_map, &key)
            if found >= 0:
                return found
        return -1

    cdef int32_t lookup6(self, const uint8_t* addr) noexcept nogil:
        """Peer index for an IPv6 destination (16 bytes, network order); -1 if none."""
        cdef int32_t k, found
        cdef uint64_t hi = be64(addr), lo = be64(addr + 8)
        cdef Key key
        for k in range(self.nlengths6):
            key = key6(hi, lo, self.lengths6[k])
            found = hm_get(&self.route_map, &key)
            if found >= 0:
                return found
        return -1

    cdef int32_t find_peer(self, uint32_t ip) noexcept nogil:
        cdef Key key
        key.hi = 0
        key.lo = ip
        key.tag = (4 << 8) | PEER_TAG
        return hm_get(&self.peer_by_ip, &key)

    cdef int32_t find_peer6(self, const uint8_t* ip) noexcept nogil:
        cdef Key key
        key.hi = be64(ip)
        key.lo = be64(ip + 8)
        key.tag = (6 << 8) | PEER_TAG
        return hm_get(&self.peer_by_ip, &key)

    cdef void _recount_lengths(self) noexcept:
        cdef int plen
        self.nlengths4 = 0
        for plen in range(32, -1, -1):
            if self.per_length4[plen] > 0:
                self.lengths4[self.nlengths4] = plen
                self.nlengths4 += 1
        self.nlengths6 = 0
        for plen in range(128, -1, -1):
            if self.per_length6[plen] > 0:
                self.lengths6[self.nlengths6] = plen
                self.nlengths6 += 1

    cdef int32_t _peer_ref(self, Key ip, int family, uint16_t port) except -1:
        cdef int32_t index = hm_get(&self.peer_by_ip, &ip)
        cdef Peer* grown
        if index >= 0 and self.port_of(index) == port:
            self.peers[index].refs += 1
            return index
        if index >= 0:
            raise ValueError("every peer must use the same UDP port, as upstream (the port is not in the lease)")
        for index in range(self.peer_capacity):
            if self.peers[index].refs == 0:
                break
        else:
            grown = <Peer*>calloc(self.peer_capacity * 2, sizeof(Peer))
            if grown == NULL:
                raise MemoryError()
            memcpy(grown, self.peers, self.peer_capacity * sizeof(Peer))
            free(self.peers)
            self.peers = grown
            index = self.peer_capacity
            self.peer_capacity *= 2
        memset(&self.peers[index], 0, sizeof(Peer))
        self.peers[index].refs = 1
        set_endpoint(&self.peers[index], ip, family, port)
        hm_put(&self.peer_by_ip, ip, index)
        return index

    cdef int port_of(self, int32_t index) noexcept:
        if self.peers[index].family == 4:
            return ntohs(self.peers[index].addr4.sin_port)
        return ntohs(self.peers[index].addr6.sin6_port)

    cdef void _peer_unref(self, int32_t index) noexcept:
        self.peers[index].refs -= 1
        if self.peers[index].refs == 0:
            hm_del(&self.peer_by_ip, &self.peers[index].ip)

    # -- Python API: called on lease events, never per packet -------------------------------------------------
    def set_route(self, network, peer_ip, int port):
        """Route an overlay subnet (IPv4 or IPv6) to a peer (an underlay address of either family); an existing route
        for the same subnet gets the new next hop."""
        cdef Key key, ip
        cdef int family
        key, _ = _prefix_key(network)
        ip, family = _address_key(peer_ip)
        with nogil:
            self.lock_for_change()
        try:
            self._set(key, ip, family, port)
        finally:
            self.unlock()

    cdef int _set(self, Key key, Key ip, int family, int port) except -1:
        cdef int32_t old = hm_get(&self.route_map, &key)
        cdef int plen = key.tag & 0xFF
        if old >= 0 and _same(&self.peers[old].ip, &ip) and self.port_of(old) == port:
            return 0
        cdef int32_t index = self._peer_ref(ip, family, port)
        hm_put(&self.route_map, key, index)
        self.generation += 1
        if old >= 0:
            self._peer_unref(old)
        else:
            self.route_count += 1
            if key.tag >> 8 == 4:
                self.per_length4[plen] += 1
            else:
                self.per_length6[plen] += 1
            self._recount_lengths()
        return 0

    def delete_route(self, network):
        cdef Key key
        key, _ = _prefix_key(network)
        cdef int plen = key.tag & 0xFF
        cdef int32_t old
        with nogil:
            self.lock_for_change()
        try:
            old = hm_get(&self.route_map, &key)
            if old < 0:
                return False
            hm_del(&self.route_map, &key)
            self._peer_unref(old)
            self.generation += 1
            self.route_count -= 1
            if key.tag >> 8 == 4:
                self.per_length4[plen] -= 1
            else:
                self.per_length6[plen] -= 1
            self._recount_lengths()
            return True
        finally:
            self.unlock()

    def __len__(self):
        return self.route_count

    def entries(self):
        """[(subnet, peer ip, port)] in no particular order."""
        raw = []
        cdef uint32_t i
        with nogil:
            self.lock()
        try:
            for i in range(self.route_map.capacity):
                if self.route_map.slots[i].state == 1:
                    index = self.route_map.slots[i].value
                    raw.append((self.route_map.slots[i].key, self.peers[index].ip, self.port_of(index)))
        finally:
            self.unlock()
        return [(_key_network(key), _key_address(ip), port) for key, ip, port in raw]

    def lookup_peer(self, address):
        """(peer ip, port) that a destination (IPv4 or IPv6) is sent to, or None."""
        ip = ipaddress.ip_address(str(address))
        cdef bytes packed = ip.packed
        cdef const uint8_t* raw = packed
        cdef int32_t index
        cdef bint v4 = ip.version == 4
        cdef uint32_t addr = int(ip) if v4 else 0
        with nogil:
            self.lock()
            index = self.lookup(addr) if v4 else self.lookup6(raw)
        try:
            if index < 0:
                return None
            return _key_address(self.peers[index].ip), self.port_of(index)
        finally:
            self.unlock()

    def move_peer(self, int32_t index, address, int port):
        """Point peer `index` at another underlay endpoint (a WireGuard peer that roamed: its authenticated messages
        now come from there), keeping its routes and counters. False if that address is another peer's."""
        cdef Key ip
        cdef int family
        cdef int32_t other
        ip, family = _address_key(address)
        with nogil:
            self.lock_for_change()
        try:
            if index < 0 or index >= self.peer_capacity or self.peers[index].refs == 0:
                return False
            other = hm_get(&self.peer_by_ip, &ip)
            if other >= 0 and other != index:
                return False
            hm_del(&self.peer_by_ip, &self.peers[index].ip)
            set_endpoint(&self.peers[index], ip, family, port)
            hm_put(&self.peer_by_ip, ip, index)
            self.generation += 1
            return True
        finally:
            self.unlock()

    def peer_index(self, network):
        """The index of the peer a route points at (stable while any route uses that peer), -1 without the route.
        The wireguard backend keeps each peer's sessions by this index."""
        cdef Key key
        key, _ = _prefix_key(network)
        with nogil:
            self.lock()
        try:
            return hm_get(&self.route_map, &key)
        finally:
            self.unlock()

    def peer_stats(self):
        """{peer ip: (tx packets, tx bytes, rx packets, rx bytes)} for the peers of current routes."""
        raw = []
        cdef int32_t i
        with nogil:
            self.lock()
        try:
            for i in range(self.peer_capacity):
                if self.peers[i].refs > 0:
                    p = &self.peers[i]
                    raw.append(
                        (
                            p.ip,
                            (
                                counter_read(&p.tx_packets),
                                counter_read(&p.tx_bytes),
                                counter_read(&p.rx_packets),
                                counter_read(&p.rx_bytes),
                            ),
                        )
                    )
        finally:
            self.unlock()
        return {str(_key_address(ip)): counters for ip, counters in raw}
