# cython: language_level=3
"""Route table of the udp backend: overlay subnet -> peer (public IP, port), longest-prefix match, in C.

Upstream scans a list; here a lookup probes one hash table per prefix length in use (normally one: every lease has
SubnetLen), so its cost does not grow with the number of routes. Per-peer counters live beside the peer so the pump
updates them without a second lookup.
"""
import ipaddress

from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

cdef uint32_t MIN_CAPACITY = 64


cdef inline uint64_t _mix(uint64_t k) noexcept nogil:
    # splitmix64 finaliser: neighbouring subnets land far apart.
    k ^= k >> 30
    k *= <uint64_t>0xbf58476d1ce4e5b9
    k ^= k >> 27
    k *= <uint64_t>0x94d049bb133111eb
    k ^= k >> 31
    return k


cdef int hm_init(HashMap* m, uint32_t capacity) except -1:
    m.slots = <Slot*>calloc(capacity, sizeof(Slot))
    if m.slots == NULL:
        raise MemoryError()
    m.capacity = capacity
    m.used = 0
    m.deleted = 0
    return 0


cdef inline int32_t hm_get(const HashMap* m, uint64_t key) noexcept nogil:
    cdef uint32_t mask = m.capacity - 1
    cdef uint32_t i = <uint32_t>_mix(key) & mask
    while True:
        if m.slots[i].state == 0:
            return -1
        if m.slots[i].state == 1 and m.slots[i].key == key:
            return m.slots[i].value
        i = (i + 1) & mask


cdef int hm_put(HashMap* m, uint64_t key, int32_t value) except -1:
    cdef uint32_t mask, i
    cdef int32_t tomb = -1
    if (m.used + m.deleted + 1) * 2 > m.capacity:
        hm_rehash(m, m.capacity * 2 if (m.used + 1) * 4 > m.capacity else m.capacity)
    mask = m.capacity - 1
    i = <uint32_t>_mix(key) & mask
    while True:
        if m.slots[i].state == 0:
            break
        if m.slots[i].state == 1 and m.slots[i].key == key:
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


cdef int hm_del(HashMap* m, uint64_t key) noexcept:
    cdef uint32_t mask = m.capacity - 1
    cdef uint32_t i = <uint32_t>_mix(key) & mask
    while m.slots[i].state != 0:
        if m.slots[i].state == 1 and m.slots[i].key == key:
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


cdef inline uint32_t mask_of(int plen) noexcept nogil:
    cdef uint32_t ones = 0xFFFFFFFF
    return 0 if plen == 0 else ones << (32 - plen)


cdef class RouteTable:
    def __cinit__(self):
        pthread_mutex_init(&self.mutex, NULL)
        hm_init(&self.route_map, MIN_CAPACITY)
        hm_init(&self.peer_by_ip, MIN_CAPACITY)
        self.peer_capacity = 16
        self.peers = <Peer*>calloc(self.peer_capacity, sizeof(Peer))
        if self.peers == NULL:
            raise MemoryError()
        self.route_count = 0
        memset(self.per_length, 0, sizeof(self.per_length))
        self.nlengths = 0

    def __dealloc__(self):
        pthread_mutex_destroy(&self.mutex)
        free(self.route_map.slots)
        free(self.peer_by_ip.slots)
        free(self.peers)

    cdef int32_t lookup(self, uint32_t addr) noexcept nogil:
        """Peer index for a destination (host byte order), longest prefix first; -1 if none."""
        cdef int32_t k, plen, found
        for k in range(self.nlengths):
            plen = self.lengths[k]
            found = hm_get(&self.route_map, (<uint64_t>plen << 32) | (addr & mask_of(plen)))
            if found >= 0:
                return found
        return -1

    cdef int32_t find_peer(self, uint32_t ip) noexcept nogil:
        return hm_get(&self.peer_by_ip, ip)

    cdef void _recount_lengths(self) noexcept:
        cdef int plen
        self.nlengths = 0
        for plen in range(32, -1, -1):
            if self.per_length[plen] > 0:
                self.lengths[self.nlengths] = plen
                self.nlengths += 1

    cdef int32_t _peer_ref(self, uint32_t ip, uint16_t port) except -1:
        cdef int32_t index = hm_get(&self.peer_by_ip, ip)
        cdef Peer* grown
        if index >= 0 and ntohs(self.peers[index].addr.sin_port) == port:
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
        self.peers[index].ip = ip
        self.peers[index].refs = 1
        self.peers[index].addr.sin_family = AF_INET
        self.peers[index].addr.sin_port = htons(port)
        self.peers[index].addr.sin_addr.s_addr = htonl(ip)
        hm_put(&self.peer_by_ip, ip, index)
        return index

    cdef void _peer_unref(self, int32_t index) noexcept:
        self.peers[index].refs -= 1
        if self.peers[index].refs == 0:
            hm_del(&self.peer_by_ip, self.peers[index].ip)

    # -- Python API: called on lease events, never per packet -------------------------------------------------
    def set_route(self, network, peer_ip, int port):
        """Route an overlay subnet to a peer; an existing route for the same subnet gets the new next hop."""
        net = ipaddress.IPv4Network(network)
        cdef uint32_t ip = int(ipaddress.IPv4Address(peer_ip))
        cdef int plen = net.prefixlen
        cdef uint64_t key = (<uint64_t>plen << 32) | <uint32_t>int(net.network_address)
        with nogil:
            self.lock()
        try:
            self._set(key, plen, ip, port)
        finally:
            self.unlock()

    cdef int _set(self, uint64_t key, int plen, uint32_t ip, int port) except -1:
        cdef int32_t old = hm_get(&self.route_map, key)
        if old >= 0 and self.peers[old].ip == ip and ntohs(self.peers[old].addr.sin_port) == port:
            return 0
        cdef int32_t index = self._peer_ref(ip, port)
        hm_put(&self.route_map, key, index)
        if old >= 0:
            self._peer_unref(old)
        else:
            self.route_count += 1
            self.per_length[plen] += 1
            self._recount_lengths()
        return 0

    def delete_route(self, network):
        net = ipaddress.IPv4Network(network)
        cdef int plen = net.prefixlen
        cdef uint64_t key = (<uint64_t>plen << 32) | <uint32_t>int(net.network_address)
        cdef int32_t old
        with nogil:
            self.lock()
        try:
            old = hm_get(&self.route_map, key)
            if old < 0:
                return False
            hm_del(&self.route_map, key)
            self._peer_unref(old)
            self.route_count -= 1
            self.per_length[plen] -= 1
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
                    peer = &self.peers[self.route_map.slots[i].value]
                    raw.append((self.route_map.slots[i].key, peer.ip, ntohs(peer.addr.sin_port)))
        finally:
            self.unlock()
        return [(ipaddress.IPv4Network((key & 0xFFFFFFFF, key >> 32)), ipaddress.IPv4Address(ip), port)
                for key, ip, port in raw]

    def lookup_peer(self, address):
        """(peer ip, port) that a destination is sent to, or None."""
        cdef uint32_t addr = int(ipaddress.IPv4Address(address))
        cdef int32_t index
        cdef uint32_t ip = 0
        cdef int port = 0
        with nogil:
            self.lock()
            index = self.lookup(addr)
            if index >= 0:
                ip = self.peers[index].ip
                port = ntohs(self.peers[index].addr.sin_port)
            self.unlock()
        if index < 0:
            return None
        return ipaddress.IPv4Address(ip), port

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
                    raw.append((p.ip, (p.tx_packets, p.tx_bytes, p.rx_packets, p.rx_bytes)))
        finally:
            self.unlock()
        return {str(ipaddress.IPv4Address(ip)): counters for ip, counters in raw}

    def bench_lookups(self, const unsigned char[:] addresses, int rounds=1):
        """Look up every big-endian IPv4 address in the buffer `rounds` times, in C; returns the hits (benchmarks)."""
        cdef Py_ssize_t n = addresses.shape[0] // 4, i
        cdef int r
        cdef long hits = 0
        cdef uint32_t a
        with nogil:
            for r in range(rounds):
                for i in range(n):
                    a = (<uint32_t>addresses[4*i] << 24) | (<uint32_t>addresses[4*i+1] << 16) | (<uint32_t>addresses[4*i+2] << 8) | addresses[4*i+3]
                    if self.lookup(a) >= 0:
                        hits += 1
        return hits
