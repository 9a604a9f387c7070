# cython: language_level=3
"""The UDP side of the udp data plane (see udp.pxd).

Sending: the pump queues datagrams into slots; send() groups the slots into messages (gso_run_end: each run of
equal-size datagrams for one peer is one UDP GSO message, UDP_SEGMENT), then one sendmmsg per run of messages of one
underlay family. The kernel moves a run as one buffer and cuts it into ordinary datagrams only where it must (at the
latest in a receiver without UDP_GRO, so upstream peers see exactly upstream's wire format). A full socket buffer holds
the batch up to SEND_WAIT_MS; EIO on a GSO message (a kernel or device that cannot) turns GSO off for good and resends
the rest datagram by datagram.
Receiving: recvmmsg a batch; with UDP_GRO a message may hold a run of datagrams from one sender, cut at gro_size().
"""
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint16_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

from posix.unistd cimport write

from _fastpath.clib cimport *
from _fastpath.routes cimport Peer

UDP_GRO_OPTION = (SOL_UDP, UDP_GRO)  # for the Python side's setsockopt: CPython's socket module lacks them


cdef class UdpSide:
    def __cinit__(self, int sock_fd, int sock6_fd=-1, bint gso=False, bint gro=False, int notify_fd=-1,
                  int send_fd=-1, int send6_fd=-1):
        self.sock_fd = sock_fd
        self.sock6_fd = sock6_fd
        self.send_fd = send_fd if send_fd >= 0 else sock_fd
        self.send6_fd = send6_fd if send6_fd >= 0 else sock6_fd
        self.gso = gso
        self.gro = gro
        self.gso_error = 0
        self.notify_fd = notify_fd
        self.rx_bufs = <uint8_t*>calloc(BATCH, BUF_SIZE)
        if self.rx_bufs == NULL:
            raise MemoryError()
        memset(self.rx_msgs, 0, sizeof(self.rx_msgs))
        memset(self.gso_msgs, 0, sizeof(self.gso_msgs))
        cdef int i
        for i in range(BATCH):
            self.rx_iov[i].iov_base = self.rx_bufs + <size_t>i * BUF_SIZE
            self.rx_iov[i].iov_len = BUF_SIZE
            self.rx_msgs[i].msg_hdr.msg_iov = &self.rx_iov[i]
            self.rx_msgs[i].msg_hdr.msg_iovlen = 1
            self.rx_msgs[i].msg_hdr.msg_name = &self.rx_addr[i]

    def __dealloc__(self):
        free(self.rx_bufs)

    # -- sending -----------------------------------------------------------------------------------------------------
    cdef int _message(self, int first, int n, int m, RouteTable routes) noexcept nogil:
        """Fill gso_msgs[m] with the run starting at slot `first`; returns the slot after it."""
        cdef int end = gso_run_end(self.tx_len, self.tx_peer, first, n, self.gso)
        cdef msghdr* h = &self.gso_msgs[m].msg_hdr
        cdef cmsghdr* c
        cdef Peer* p = &routes.peers[self.tx_peer[first]]
        self.gso_family[m] = p.family
        if p.family == 4:
            memcpy(&self.gso_addr[m], &p.addr4, sizeof(sockaddr_in))
            h.msg_namelen = sizeof(sockaddr_in)
        else:
            memcpy(&self.gso_addr[m], &p.addr6, sizeof(sockaddr_in6))
            h.msg_namelen = sizeof(sockaddr_in6)
        h.msg_name = &self.gso_addr[m]
        h.msg_iov = &self.tx_iov[2 * first]
        h.msg_iovlen = 2 * (end - first)  # the kernel cuts the run at the segment size whatever the iovec boundaries
        if end - first > 1:
            h.msg_control = &self.gso_ctrl[m][0]
            h.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
            c = CMSG_FIRSTHDR(h)
            c.cmsg_level = SOL_UDP
            c.cmsg_type = UDP_SEGMENT
            c.cmsg_len = CMSG_LEN(sizeof(uint16_t))
            (<uint16_t*>CMSG_DATA(c))[0] = <uint16_t>self.tx_len[first]
        else:
            h.msg_control = NULL
            h.msg_controllen = 0
        self.gso_first[m] = first
        return end

    cdef void send(self, int n, RouteTable routes) noexcept nogil:
        """Send slots 0..n-1. The caller holds the route table's lock; a full socket buffer's wait lets go of it, so
        that a lease event is never held up by the underlay (each message carries a copy of its peer's address)."""
        cdef int msgs = 0, first = 0, sent = 0, r, i, k, end, fd, ready
        cdef uint64_t run_bytes
        cdef pollfd waiter
        cdef Peer* p
        cdef uint64_t generation
        cdef bint counting = True  # per-peer counters, while the peers are the ones the slots name
        while first < n:
            first = self._message(first, n, msgs, routes)
            msgs += 1
        self.gso_first[msgs] = n
        self.send_batches += 1
        while sent < msgs:
            # One sendmmsg per run of messages of one underlay family: each family has its own socket.
            end = sent + 1
            while end < msgs and self.gso_family[end] == self.gso_family[sent]:
                end += 1
            fd = self.send_fd if self.gso_family[sent] == 4 else self.send6_fd
            r = sendmmsg(fd, &self.gso_msgs[sent], end - sent, MSG_DONTWAIT)
            if r < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    # A full socket buffer: wait briefly (TCP inside prefers delay to loss), then give up on the rest.
                    waiter.fd = fd
                    waiter.events = POLLOUT
                    waiter.revents = 0
                    generation = routes.generation
                    routes.unlock()
                    ready = poll(&waiter, 1, SEND_WAIT_MS)
                    routes.lock()
                    if routes.generation != generation:
                        counting = False  # a lease event changed peers meanwhile: the slots' indices may be stale
                    if ready > 0:
                        continue
                    self.send_failed += n - self.gso_first[sent]
                    return
                if self.gso and errno == EIO and self.gso_first[sent + 1] - self.gso_first[sent] > 1:
                    # The kernel cannot segment for this path: GSO is off from now on; resend the rest plainly.
                    self.gso = False
                    self.gso_error = errno
                    self._notify()
                    first = self.gso_first[sent]
                    for i in range(first, n):  # move the rest to the front, then send it datagram by datagram
                        self.tx_iov[2 * (i - first)] = self.tx_iov[2 * i]
                        self.tx_iov[2 * (i - first) + 1] = self.tx_iov[2 * i + 1]
                        self.tx_len[i - first] = self.tx_len[i]
                        self.tx_peer[i - first] = self.tx_peer[i]
                    self.send(n - first, routes)
                    return
                # This datagram (run) is refused, e.g. no route to the peer: count it and go on with the rest.
                self.send_failed += self.gso_first[sent + 1] - self.gso_first[sent]
                sent += 1
                continue
            for k in range(sent, sent + r):
                if self.gso_first[k + 1] - self.gso_first[k] > 1:
                    self.gso_sends += 1
                run_bytes = 0
                for i in range(self.gso_first[k], self.gso_first[k + 1]):
                    run_bytes += self.tx_len[i]
                self.sent_packets += self.gso_first[k + 1] - self.gso_first[k]
                self.sent_bytes += run_bytes
                if counting:  # one message is one peer's: its counters are shared by the pumps, added to once
                    p = &routes.peers[self.tx_peer[self.gso_first[k]]]
                    counter_add(&p.tx_packets, self.gso_first[k + 1] - self.gso_first[k])
                    counter_add(&p.tx_bytes, run_bytes)
            sent += r

    cdef void _notify(self) noexcept nogil:
        cdef uint64_t one = 1
        if self.notify_fd >= 0:
            write(self.notify_fd, &one, sizeof(one))

    # -- receiving ---------------------------------------------------------------------------------------------------
    cdef int receive(self, int fd, bint v6) noexcept nogil:
        """One recvmmsg on fd (the IPv6 socket if v6): the number of messages, <= 0 when nothing is queued."""
        cdef int i, n
        cdef int want = GRO_BATCH if self.gro else BATCH
        for i in range(want):
            self.rx_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in6)
            self.rx_msgs[i].msg_hdr.msg_flags = 0
            if self.gro:
                self.rx_msgs[i].msg_hdr.msg_control = &self.rx_ctrl[i][0]
                self.rx_msgs[i].msg_hdr.msg_controllen = sizeof(self.rx_ctrl[i])
        while True:
            n = recvmmsg(fd, self.rx_msgs, want, MSG_DONTWAIT, NULL)
            if n < 0 and errno == EINTR:
                continue
            if n > 0:
                self.receive_batches += 1
            return n

    cdef uint8_t* received(self, int i) noexcept nogil:
        """Message i's bytes (its length: rx_msgs[i].msg_len); NULL when it was truncated."""
        if self.rx_msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
            return NULL
        return self.rx_bufs + <size_t>i * BUF_SIZE

    cdef int32_t sender(self, int i, bint v6, RouteTable routes) noexcept nogil:
        """The peer index of message i's sender, -1 if no route uses that address."""
        if v6:
            return routes.find_peer6(self.rx_addr[i].sin6_addr.s6_addr)
        return routes.find_peer(ntohl((<sockaddr_in*>&self.rx_addr[i]).sin_addr.s_addr))

    cdef Py_ssize_t gro_size(self, int i) noexcept nogil:
        """The size message i's datagrams were cut at when it is a GRO run; 0 for a single datagram."""
        cdef cmsghdr* c
        cdef Py_ssize_t seg = 0
        if not self.gro:
            return 0
        c = CMSG_FIRSTHDR(&self.rx_msgs[i].msg_hdr)
        while c != NULL:
            if c.cmsg_level == SOL_UDP and c.cmsg_type == UDP_GRO:
                seg = (<int*>CMSG_DATA(c))[0]
            c = CMSG_NXTHDR(&self.rx_msgs[i].msg_hdr, c)
        if seg >= self.rx_msgs[i].msg_len:
            return 0
        if seg > 0:
            self.gro_receives += 1
        return seg


# -- Python face, for table tests ----------------------------------------------------------------------------------
def gso_runs(lengths, peers, bint gso=True):
    """The messages a batch of datagrams (their lengths and peer indexes) is sent as: [(first, end)] slot ranges."""
    cdef size_t c_lengths[BATCH]
    cdef int32_t c_peers[BATCH]
    cdef int n = len(lengths), first = 0, end
    if n > BATCH or len(peers) != n:
        raise ValueError(f"at most {BATCH} datagrams, one peer each")
    for i in range(n):
        c_lengths[i] = lengths[i]
        c_peers[i] = peers[i]
    runs = []
    while first < n:
        end = gso_run_end(c_lengths, c_peers, first, n, gso)
        runs.append((first, end))
        first = end
    return runs
