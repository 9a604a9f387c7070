# cython: language_level=3
"""The udp backend's data plane: moves packets TUN <-> UDP in batches, without the GIL and without Python objects.

The event loop calls on_tun_readable/on_socket_readable from add_reader; each call drains its fd until EAGAIN or until
BURST packets (so one direction cannot starve the other; readiness is level-triggered, the rest comes next round).
TUN -> UDP: read packets one by one (the TUN has no batch read), check, route, TTL-1, then one sendmmsg per batch.
UDP -> TUN: recvmmsg a batch, check each datagram (sender is a lease's PublicIP, inner source in its subnet, inner
destination in ours), TTL-1, write each to the TUN. The batch arrays are where TUN offloads and UDP GSO/GRO plug in.
"""
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

from posix.unistd cimport read, write

from _fastpath.packet cimport *
from _fastpath.routes cimport Peer, RouteTable, ntohl, sockaddr_in

from _fastpath.packet import VERDICT_NAMES


cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void* iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    cdef struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int recvmmsg(int fd, mmsghdr* vec, unsigned int n, int flags, void* timeout)
    int sendmmsg(int fd, mmsghdr* vec, unsigned int n, int flags)
    int MSG_DONTWAIT
    int MSG_TRUNC

cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long n, int timeout)
    short POLLOUT

cdef enum:
    BATCH = 64
    BUF_SIZE = 65536  # any IPv4 packet: datagrams are never truncated silently
    DEFAULT_BURST = 1024
    SEND_WAIT_MS = 20  # how long a full socket buffer may hold a batch before its rest is dropped


cdef class Pump:
    cdef int tun_fd
    cdef int sock_fd
    cdef RouteTable routes
    cdef uint32_t own_net, own_mask, own_addr
    cdef bint protect
    cdef int burst
    cdef uint8_t* tx_bufs
    cdef mmsghdr tx_msgs[BATCH]
    cdef iovec tx_iov[BATCH]
    cdef int32_t tx_peer[BATCH]
    cdef uint8_t* rx_bufs
    cdef mmsghdr rx_msgs[BATCH]
    cdef iovec rx_iov[BATCH]
    cdef sockaddr_in rx_addr[BATCH]
    cdef uint8_t icmp_buf[128]
    cdef uint64_t drops_out[V_COUNT]
    cdef uint64_t drops_in[V_COUNT]
    cdef uint64_t tun_read_packets, udp_sent_packets, udp_sent_bytes
    cdef uint64_t udp_received_packets, tun_written_packets, tun_written_bytes, icmp_sent
    cdef uint64_t tun_wakeups, socket_wakeups, send_batches, receive_batches

    def __cinit__(self, int tun_fd, int sock_fd, RouteTable routes, own_subnet, bint protect=True, int burst=DEFAULT_BURST):
        import ipaddress
        net = ipaddress.IPv4Network(own_subnet)
        self.tun_fd = tun_fd
        self.sock_fd = sock_fd
        self.routes = routes
        self.own_net = int(net.network_address)
        self.own_mask = int(net.netmask)
        self.own_addr = self.own_net  # the TUN's address and ICMP source, as upstream
        self.protect = protect
        self.burst = burst
        self.tx_bufs = <uint8_t*>calloc(BATCH, BUF_SIZE)
        self.rx_bufs = <uint8_t*>calloc(BATCH, BUF_SIZE)
        if self.tx_bufs == NULL or self.rx_bufs == NULL:
            raise MemoryError()
        memset(self.tx_msgs, 0, sizeof(self.tx_msgs))
        memset(self.rx_msgs, 0, sizeof(self.rx_msgs))
        cdef int i
        for i in range(BATCH):
            self.tx_msgs[i].msg_hdr.msg_iov = &self.tx_iov[i]
            self.tx_msgs[i].msg_hdr.msg_iovlen = 1
            self.tx_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
            self.rx_iov[i].iov_base = self.rx_bufs + <size_t>i * BUF_SIZE
            self.rx_iov[i].iov_len = BUF_SIZE
            self.rx_msgs[i].msg_hdr.msg_iov = &self.rx_iov[i]
            self.rx_msgs[i].msg_hdr.msg_iovlen = 1
            self.rx_msgs[i].msg_hdr.msg_name = &self.rx_addr[i]

    def __dealloc__(self):
        free(self.tx_bufs)
        free(self.rx_bufs)

    def on_tun_readable(self):
        with nogil:
            self.tun_wakeups += 1
            self._tun_to_udp()

    def on_socket_readable(self):
        with nogil:
            self.socket_wakeups += 1
            self._udp_to_tun()

    cdef void _tun_to_udp(self) noexcept nogil:
        cdef int handled = 0, n, verdict
        cdef bint drained = False
        cdef Py_ssize_t r, reply
        cdef int32_t peer
        cdef uint8_t* buf
        while handled < self.burst and not drained:
            n = 0
            while n < BATCH:
                buf = self.tx_bufs + <size_t>n * BUF_SIZE
                r = read(self.tun_fd, buf, BUF_SIZE)
                if r < 0:
                    if errno != EINTR:
                        drained = True  # EAGAIN, or an error that the next readiness will show again
                        break
                    continue
                handled += 1
                self.tun_read_packets += 1
                verdict = check_ipv4(buf, r)
                if verdict == V_OK:
                    peer = self.routes.lookup(be32(buf + 16))
                    if peer < 0:
                        verdict = V_NO_ROUTE
                        reply = build_net_unreachable(buf, r, self.own_addr, self.icmp_buf)
                        if reply > 0 and write(self.tun_fd, self.icmp_buf, reply) == reply:
                            self.icmp_sent += 1
                    else:
                        verdict = decrement_ttl(buf)
                if verdict != V_OK:
                    self.drops_out[verdict] += 1
                    continue
                self.tx_iov[n].iov_base = buf
                self.tx_iov[n].iov_len = r
                self.tx_msgs[n].msg_hdr.msg_name = &self.routes.peers[peer].addr
                self.tx_peer[n] = peer
                n += 1
                if handled >= self.burst:
                    break
            if n > 0:
                self._send_batch(n)

    cdef void _send_batch(self, int n) noexcept nogil:
        cdef int sent = 0, r, i
        cdef pollfd waiter
        cdef Peer* p
        self.send_batches += 1
        while sent < n:
            r = sendmmsg(self.sock_fd, &self.tx_msgs[sent], n - sent, MSG_DONTWAIT)
            if r < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    # A full socket buffer: wait briefly (TCP inside prefers delay to loss), then give up on the rest.
                    waiter.fd = self.sock_fd
                    waiter.events = POLLOUT
                    waiter.revents = 0
                    if poll(&waiter, 1, SEND_WAIT_MS) > 0:
                        continue
                    self.drops_out[V_SEND_FAILED] += n - sent
                    return
                self.drops_out[V_SEND_FAILED] += 1  # this datagram is refused (e.g. no route to the peer)
                sent += 1
                continue
            for i in range(sent, sent + r):
                p = &self.routes.peers[self.tx_peer[i]]
                p.tx_packets += 1
                p.tx_bytes += self.tx_iov[i].iov_len
                self.udp_sent_packets += 1
                self.udp_sent_bytes += self.tx_iov[i].iov_len
            sent += r

    cdef void _udp_to_tun(self) noexcept nogil:
        cdef int handled = 0, n, i, verdict
        cdef int32_t peer
        cdef uint8_t* buf
        cdef Py_ssize_t length, w
        cdef Peer* p
        while handled < self.burst:
            for i in range(BATCH):
                self.rx_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
                self.rx_msgs[i].msg_hdr.msg_flags = 0
            n = recvmmsg(self.sock_fd, self.rx_msgs, BATCH, MSG_DONTWAIT, NULL)
            if n <= 0:
                if n < 0 and errno == EINTR:
                    continue
                return
            self.receive_batches += 1
            handled += n
            for i in range(n):
                self.udp_received_packets += 1
                buf = self.rx_bufs + <size_t>i * BUF_SIZE
                length = self.rx_msgs[i].msg_len
                if self.rx_msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
                    self.drops_in[V_TRUNCATED] += 1
                    continue
                verdict = classify_inbound(buf, length, ntohl(self.rx_addr[i].sin_addr.s_addr), self.routes,
                                           self.own_net, self.own_mask, self.protect, &peer)
                if verdict == V_OK:
                    verdict = decrement_ttl(buf)
                if verdict != V_OK:
                    self.drops_in[verdict] += 1
                    continue
                w = write(self.tun_fd, buf, length)
                if w != length:
                    self.drops_in[V_TUN_WRITE_FAILED] += 1
                    continue
                self.tun_written_packets += 1
                self.tun_written_bytes += length
                if peer >= 0:
                    p = &self.routes.peers[peer]
                    p.rx_packets += 1
                    p.rx_bytes += length
            if n < BATCH:
                return

    def counters(self):
        """Totals and drops by reason and direction, for /metrics and tests."""
        return {
            "tun_read_packets": self.tun_read_packets,
            "udp_sent_packets": self.udp_sent_packets,
            "udp_sent_bytes": self.udp_sent_bytes,
            "udp_received_packets": self.udp_received_packets,
            "tun_written_packets": self.tun_written_packets,
            "tun_written_bytes": self.tun_written_bytes,
            "icmp_unreachable_sent": self.icmp_sent,
            "tun_wakeups": self.tun_wakeups,
            "socket_wakeups": self.socket_wakeups,
            "send_batches": self.send_batches,
            "receive_batches": self.receive_batches,
            "drops_tun_to_udp": {VERDICT_NAMES[i]: self.drops_out[i] for i in range(1, V_COUNT) if self.drops_out[i]},
            "drops_udp_to_tun": {VERDICT_NAMES[i]: self.drops_in[i] for i in range(1, V_COUNT) if self.drops_in[i]},
        }
