# cython: language_level=3
"""The udp backend's data plane: moves packets TUN <-> UDP in batches, without the GIL and without Python objects.

The pump runs in a thread of its own (run(stop_fd)): a poll() loop over both fds that never takes the GIL, so no
control-plane work in the interpreter (lease watches, netlink, SQLite, metrics, garbage collection) can delay a packet;
a lone packet leaves at once, batches form only from what is already queued. Each wake-up drains a ready fd until
EAGAIN or until DEFAULT_BURST datagrams (so one direction cannot starve the other; readiness is level-triggered, the
rest comes next round). on_tun_readable/on_socket_readable drain one side in such rounds for callers that drive the
pump themselves (tests).
Lease events change the route table under its mutex, which the pump holds for one round at a time.
TUN -> UDP: read packets one by one (the TUN has no batch read), check, route, TTL-1, then one sendmmsg per batch in
which each run of equal-size packets for one peer is a single UDP GSO message (UDP_SEGMENT): the kernel moves the run
as one buffer and cuts it into ordinary datagrams only where it must (at the latest in a receiver without UDP_GRO, so
upstream peers see exactly upstream's wire format).
UDP -> TUN: recvmmsg a batch (with UDP_GRO, one message may hold a run of datagrams from one sender, cut at gso_size),
check each datagram (sender is a lease's PublicIP, inner source in its subnet, inner destination in ours), TTL-1, and
write it to the TUN.

With TUN offloads (vnet_hdr: the TUN was opened with IFF_VNET_HDR and TUNSETOFFLOAD), a TUN read may be a 64 KB TCP or
UDP super-packet: it is routed and checked once, then cut into standalone MTU-sized packets (offload.pxd) that leave as
one UDP GSO run. The cut copies nothing: each segment is two iovecs, its rewritten headers and its payload where the
read left it, so every read buffer of a batch stays untouched until the batch is sent. And consecutive received segments of one TCP flow are glued into one TUN write (writev of the virtio
header, the first packet and the later payloads, without copying).
"""
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

from posix.unistd cimport read, write

from _fastpath.offload cimport *
from _fastpath.packet cimport *
from _fastpath.clib cimport *
from _fastpath.routes cimport Peer, RouteTable

from _fastpath.packet import VERDICT_NAMES

UDP_GRO_OPTION = (SOL_UDP, UDP_GRO)  # for the Python side's setsockopt: CPython's socket module lacks them


cdef enum:
    BATCH = 64
    BUF_SIZE = 65536 + 64  # any IP packet (IPv6: 40 + 65535) plus a virtio header: never truncated silently
    # Datagrams per round before the other direction gets its turn: one batch. A TUN read of a TSO super-packet counts
    # as the segments it becomes and a GRO receive as the datagrams it holds, so a round is bounded in work (tens of
    # microseconds), not in reads: a ping or an ACK going the other way never waits behind megabytes of bulk data.
    DEFAULT_BURST = BATCH
    GRO_BATCH = 8  # messages per receive with UDP GRO: each may hold a run of up to 64 KB of datagrams
    SEND_WAIT_MS = 20  # how long a full socket buffer may hold a batch before its rest is dropped
    GSO_MAX_SEGMENTS = 64  # the kernel's limit (UDP_MAX_SEGMENTS) on older kernels
    GSO_MAX_BYTES = 65000  # payload of one UDP datagram before segmentation: < 65535 - IP - UDP headers
    CTRL_WORDS = 4  # 32 bytes, 8-aligned: room for one cmsg with an int
    HDR_SLOT = 128  # a segment's IPv4 + TCP headers: at most 60 + 60 bytes


cdef class Pump:
    cdef int tun_fd
    cdef int sock_fd  # the IPv4 underlay's socket
    cdef int sock6_fd  # the IPv6 underlay's socket, -1 if none
    cdef RouteTable routes
    cdef OwnSubnets own
    cdef bint protect
    cdef int burst
    cdef readonly bint vnet_hdr  # TUN reads and writes carry a virtio_net_hdr (TUN offloads on)
    cdef uint8_t* tx_bufs  # BATCH read buffers: a batch has at most one read per slot
    cdef uint8_t* tx_buf[BATCH]
    cdef uint8_t tx_hdr[BATCH][HDR_SLOT]  # per slot: the headers of a segment cut from a super-packet
    cdef GsoPlan plan
    cdef Coalescer co
    cdef iovec co_iov[COALESCE_MAX_SEGMENTS + 1]
    cdef uint8_t vnet_out[VNET_HDR_LEN]
    cdef uint8_t vnet_zero[VNET_HDR_LEN]
    cdef iovec tx_iov[2 * BATCH]  # per slot: headers (or the whole packet), then payload (or nothing)
    cdef size_t tx_len[BATCH]  # per slot: the datagram's length
    cdef int32_t tx_peer[BATCH]
    cdef mmsghdr gso_msgs[BATCH]  # one per run of packets for one peer
    cdef int gso_family[BATCH]  # per message: 4 or 6, the socket it leaves by
    cdef int gso_first[BATCH + 1]
    cdef uint64_t gso_ctrl[BATCH][CTRL_WORDS]
    cdef uint64_t rx_ctrl[BATCH][CTRL_WORDS]
    cdef public bint gso  # UDP_SEGMENT on sends; turned off for good if the kernel refuses it
    cdef public bint gro  # UDP_GRO on receives (set by the caller after the setsockopt succeeded)
    cdef public int gso_error  # errno that turned GSO off, 0 if none
    cdef int notify_fd  # an eventfd told when GSO is turned off (the control plane logs it at once), -1 if none
    cdef uint8_t* rx_bufs
    cdef mmsghdr rx_msgs[BATCH]
    cdef iovec rx_iov[BATCH]
    cdef sockaddr_in6 rx_addr[BATCH]  # room for a sender of either family
    cdef uint8_t icmp_buf[ICMP6_ERROR_MAX]
    cdef uint64_t drops_out[V_COUNT]
    cdef uint64_t drops_in[V_COUNT]
    cdef uint64_t tun_read_packets, udp_sent_packets, udp_sent_bytes
    cdef uint64_t udp_received_packets, tun_written_packets, tun_written_bytes, icmp_sent
    cdef uint64_t tun_wakeups, socket_wakeups, send_batches, receive_batches, gso_sends, gro_receives
    cdef uint64_t tso_reads, tso_segments, tun_writes, coalesced_writes

    def __cinit__(self, int tun_fd, int sock_fd, RouteTable routes, own_subnet, bint protect=True, int burst=DEFAULT_BURST,
                  bint gso=False, bint gro=False, bint vnet_hdr=False, int sock6_fd=-1, own_subnet6=None,
                  int notify_fd=-1):
        self.tun_fd = tun_fd
        self.sock_fd = sock_fd
        self.sock6_fd = sock6_fd
        self.routes = routes
        self.own = own_subnets(own_subnet, own_subnet6)  # with the TUN's addresses, the sources of ICMP errors
        self.protect = protect
        self.burst = burst
        self.gso = gso
        self.gro = gro
        self.gso_error = 0
        self.notify_fd = notify_fd
        self.vnet_hdr = vnet_hdr
        self.tx_bufs = <uint8_t*>calloc(BATCH, BUF_SIZE)
        self.rx_bufs = <uint8_t*>calloc(BATCH, BUF_SIZE)
        if self.tx_bufs == NULL or self.rx_bufs == NULL:
            raise MemoryError()
        memset(self.rx_msgs, 0, sizeof(self.rx_msgs))
        memset(self.gso_msgs, 0, sizeof(self.gso_msgs))
        memset(self.vnet_zero, 0, VNET_HDR_LEN)
        self.co.count = 0
        self.co_iov[0].iov_base = self.vnet_out
        self.co_iov[0].iov_len = VNET_HDR_LEN
        cdef int i
        for i in range(BATCH):
            self.tx_buf[i] = self.tx_bufs + <size_t>i * BUF_SIZE
            self.rx_iov[i].iov_base = self.rx_bufs + <size_t>i * BUF_SIZE
            self.rx_iov[i].iov_len = BUF_SIZE
            self.rx_msgs[i].msg_hdr.msg_iov = &self.rx_iov[i]
            self.rx_msgs[i].msg_hdr.msg_iovlen = 1
            self.rx_msgs[i].msg_hdr.msg_name = &self.rx_addr[i]

    def __dealloc__(self):
        free(self.tx_bufs)
        free(self.rx_bufs)

    def on_tun_readable(self):
        """Everything queued in the TUN, in rounds, as run() would move it (for callers that drive the pump)."""
        cdef uint64_t before
        with nogil:
            while True:
                before = self.tun_read_packets
                self._tun_round()
                if self.tun_read_packets == before:
                    break

    def on_socket_readable(self):
        """Everything queued in the sockets, in rounds, as run() would move it."""
        cdef uint64_t before
        with nogil:
            while True:
                before = self.udp_received_packets
                self._socket_round(self.sock_fd, False)
                if self.sock6_fd >= 0:
                    self._socket_round(self.sock6_fd, True)
                if self.udp_received_packets == before:
                    break

    cdef inline void _tun_round(self) noexcept nogil:
        self.tun_wakeups += 1
        self.routes.lock()
        self._tun_to_udp()
        self.routes.unlock()

    cdef inline void _socket_round(self, int fd, bint v6) noexcept nogil:
        self.socket_wakeups += 1
        self.routes.lock()
        self._udp_to_tun(fd, v6)
        self.routes.unlock()

    def run(self, int stop_fd):
        """The packet loop, for a thread of its own: until stop_fd (an eventfd) is readable or an fd is closed. The GIL
        is released for its whole life."""
        cdef pollfd fds[4]
        cdef int r, i
        with nogil:
            fds[0].fd = self.tun_fd
            fds[1].fd = self.sock_fd
            fds[2].fd = self.sock6_fd  # poll() skips a negative fd
            fds[3].fd = stop_fd
            for i in range(4):
                fds[i].events = POLLIN
            while True:
                for i in range(4):
                    fds[i].revents = 0
                r = poll(fds, 4, -1)
                if r < 0:
                    if errno == EINTR:
                        continue
                    break
                if fds[3].revents or (fds[0].revents | fds[1].revents | fds[2].revents) & POLLNVAL:
                    break
                if fds[0].revents & (POLLIN | POLLERR):
                    self._tun_round()
                # A pending socket error is cleared by the receive that reports it.
                if fds[1].revents & (POLLIN | POLLERR):
                    self._socket_round(self.sock_fd, False)
                if fds[2].revents & (POLLIN | POLLERR):
                    self._socket_round(self.sock6_fd, True)

    cdef void _tun_to_udp(self) noexcept nogil:
        cdef int handled = 0, n = 0, reads = 0, verdict, i
        cdef Py_ssize_t r, length, payload, offset
        cdef int32_t peer
        cdef uint8_t* buf
        cdef uint8_t* pkt
        while handled < self.burst:
            # Buffers 0..reads-1 hold packets queued in this batch; a read that is dropped leaves its buffer free.
            buf = self.tx_buf[reads]
            r = read(self.tun_fd, buf, BUF_SIZE)
            if r < 0:
                if errno == EINTR:
                    continue
                break  # EAGAIN, or an error that the next readiness will show again
            self.tun_read_packets += 1
            pkt = buf
            length = r
            self.plan.gso_type = VNET_GSO_NONE
            self.plan.segments = 1
            if self.vnet_hdr:
                pkt = buf + VNET_HDR_LEN
                length = r - VNET_HDR_LEN
                if length < 0 or plan_gso(buf, pkt, length, &self.plan) < 0:
                    self.drops_out[V_BAD_OFFLOAD] += 1
                    handled += 1
                    continue
            handled += self.plan.segments
            verdict = classify_outbound(pkt, length, self.routes, &self.own, self.plan.gso_type != VNET_GSO_NONE, &peer)
            if verdict == V_OK:
                verdict = decrement_hops(pkt)
            elif verdict == V_NO_ROUTE:
                self._answer_unreachable(pkt, length)
            if verdict != V_OK:
                self.drops_out[verdict] += self.plan.segments
                continue
            reads += 1
            if self.plan.gso_type == VNET_GSO_NONE:
                n = self._queue(n, pkt, length, NULL, 0, peer)
                if n == 0:
                    reads = 0  # the batch went out: every buffer is free again
                continue
            # A super-packet: each segment is its own headers plus a slice of this buffer's payload.
            self.tso_reads += 1
            self.tso_segments += self.plan.segments
            for i in range(self.plan.segments):
                payload = build_segment_header(pkt, length, &self.plan, i, self.tx_hdr[n], &offset)
                n = self._queue(n, self.tx_hdr[n], self.plan.hlen, pkt + offset, payload, peer)
                if n == 0:
                    # Sent halfway through the cut: only this buffer is still in use; it becomes buffer 0.
                    self.tx_buf[reads - 1] = self.tx_buf[0]
                    self.tx_buf[0] = buf
                    reads = 1
        if n > 0:
            self._send_batch(n)

    cdef int _queue(self, int n, uint8_t* head, Py_ssize_t head_len, uint8_t* payload, Py_ssize_t payload_len,
                    int32_t peer) noexcept nogil:
        """Put a datagram for `peer` in slot n, as one piece (payload NULL) or headers + payload; send the batch when
        the slots are full. Returns the next free slot."""
        self.tx_iov[2 * n].iov_base = head
        self.tx_iov[2 * n].iov_len = head_len
        self.tx_iov[2 * n + 1].iov_base = payload
        self.tx_iov[2 * n + 1].iov_len = payload_len
        self.tx_len[n] = head_len + payload_len
        self.tx_peer[n] = peer
        if n + 1 < BATCH:
            return n + 1
        self._send_batch(BATCH)
        return 0

    cdef void _answer_unreachable(self, const uint8_t* pkt, Py_ssize_t length) noexcept nogil:
        cdef Py_ssize_t reply
        if (pkt[0] >> 4) == 6:
            reply = build_no_route6(pkt, length, self.own.addr6, self.icmp_buf)
        else:
            reply = build_net_unreachable(pkt, length, self.own.addr4, self.icmp_buf)
        if reply > 0 and self._tun_write(self.icmp_buf, reply) == reply:
            self.icmp_sent += 1

    cdef Py_ssize_t _tun_write(self, uint8_t* pkt, Py_ssize_t length) noexcept nogil:
        """One complete packet into the TUN (behind an all-zero virtio header when offloads are on)."""
        cdef iovec parts[2]
        cdef Py_ssize_t r
        self.tun_writes += 1
        if not self.vnet_hdr:
            return write(self.tun_fd, pkt, length)
        parts[0].iov_base = self.vnet_zero
        parts[0].iov_len = VNET_HDR_LEN
        parts[1].iov_base = pkt
        parts[1].iov_len = length
        r = writev(self.tun_fd, parts, 2)
        return r - VNET_HDR_LEN if r >= VNET_HDR_LEN else -1

    cdef int _group(self, int first, int n, int m) noexcept nogil:
        """Fill gso_msgs[m] with packets first..: one packet, or with GSO the longest run for the same peer whose
        packets all have the first one's size except a shorter last one. Returns the index after the run."""
        cdef int i = first + 1
        cdef size_t seg = self.tx_len[first], total = seg, length
        cdef msghdr* h = &self.gso_msgs[m].msg_hdr
        cdef cmsghdr* c
        cdef Peer* p = &self.routes.peers[self.tx_peer[first]]
        if self.gso:
            while (i < n and self.tx_peer[i] == self.tx_peer[first] and i - first < GSO_MAX_SEGMENTS
                   and total + self.tx_len[i] <= GSO_MAX_BYTES):
                length = self.tx_len[i]
                if length > seg:
                    break
                total += length
                i += 1
                if length < seg:
                    break  # only the last segment may be shorter
        self.gso_family[m] = p.family
        if p.family == 4:
            h.msg_name = &p.addr4
            h.msg_namelen = sizeof(sockaddr_in)
        else:
            h.msg_name = &p.addr6
            h.msg_namelen = sizeof(sockaddr_in6)
        h.msg_iov = &self.tx_iov[2 * first]
        h.msg_iovlen = 2 * (i - first)  # the kernel cuts the run at seg bytes whatever the iovec boundaries
        if i - first > 1:
            h.msg_control = &self.gso_ctrl[m][0]
            h.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
            c = CMSG_FIRSTHDR(h)
            c.cmsg_level = SOL_UDP
            c.cmsg_type = UDP_SEGMENT
            c.cmsg_len = CMSG_LEN(sizeof(uint16_t))
            (<uint16_t*>CMSG_DATA(c))[0] = <uint16_t>seg
        else:
            h.msg_control = NULL
            h.msg_controllen = 0
        self.gso_first[m] = first
        return i

    cdef void _send_batch(self, int n) noexcept nogil:
        cdef int msgs = 0, first = 0, sent = 0, r, i, k, last, end, fd
        cdef pollfd waiter
        cdef Peer* p
        while first < n:
            last = self._group(first, n, msgs)
            msgs += 1
            first = last
        self.gso_first[msgs] = n
        self.send_batches += 1
        while sent < msgs:
            # One sendmmsg per run of messages of one underlay family: each family has its own socket.
            end = sent + 1
            while end < msgs and self.gso_family[end] == self.gso_family[sent]:
                end += 1
            fd = self.sock_fd if self.gso_family[sent] == 4 else self.sock6_fd
            r = sendmmsg(fd, &self.gso_msgs[sent], end - sent, MSG_DONTWAIT)
            if r < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    # A full socket buffer: wait briefly (TCP inside prefers delay to loss), then give up on the rest.
                    waiter.fd = fd
                    waiter.events = POLLOUT
                    waiter.revents = 0
                    if poll(&waiter, 1, SEND_WAIT_MS) > 0:
                        continue
                    self.drops_out[V_SEND_FAILED] += n - self.gso_first[sent]
                    return
                if self.gso and errno == EIO and self.gso_first[sent + 1] - self.gso_first[sent] > 1:
                    # The egress device cannot checksum-offload: GSO is off from now on; resend the rest plainly.
                    self.gso = False
                    self.gso_error = errno
                    self._notify()
                    first = self.gso_first[sent]
                    for i in range(first, n):  # move the rest to the front, then send it datagram by datagram
                        self.tx_iov[2 * (i - first)] = self.tx_iov[2 * i]
                        self.tx_iov[2 * (i - first) + 1] = self.tx_iov[2 * i + 1]
                        self.tx_len[i - first] = self.tx_len[i]
                        self.tx_peer[i - first] = self.tx_peer[i]
                    self._send_batch(n - first)
                    return
                # This datagram (run) is refused, e.g. no route to the peer: count it and go on with the rest.
                self.drops_out[V_SEND_FAILED] += self.gso_first[sent + 1] - self.gso_first[sent]
                sent += 1
                continue
            for k in range(sent, sent + r):
                if self.gso_first[k + 1] - self.gso_first[k] > 1:
                    self.gso_sends += 1
                for i in range(self.gso_first[k], self.gso_first[k + 1]):
                    p = &self.routes.peers[self.tx_peer[i]]
                    p.tx_packets += 1
                    p.tx_bytes += self.tx_len[i]
                    self.udp_sent_packets += 1
                    self.udp_sent_bytes += self.tx_len[i]
            sent += r

    cdef void _notify(self) noexcept nogil:
        cdef uint64_t one = 1
        if self.notify_fd >= 0:
            write(self.notify_fd, &one, sizeof(one))

    cdef void _udp_to_tun(self, int fd, bint v6) noexcept nogil:
        cdef int n, i
        cdef uint8_t* buf
        cdef Py_ssize_t length, offset, seg, piece
        cdef int32_t peer
        cdef cmsghdr* c
        cdef uint64_t start = self.udp_received_packets  # datagrams, each datagram of a GRO run counted
        cdef int want = GRO_BATCH if self.gro else BATCH
        while self.udp_received_packets - start < <uint64_t>self.burst:
            for i in range(want):
                self.rx_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in6)
                self.rx_msgs[i].msg_hdr.msg_flags = 0
                if self.gro:
                    self.rx_msgs[i].msg_hdr.msg_control = &self.rx_ctrl[i][0]
                    self.rx_msgs[i].msg_hdr.msg_controllen = sizeof(self.rx_ctrl[i])
            n = recvmmsg(fd, self.rx_msgs, want, MSG_DONTWAIT, NULL)
            if n <= 0:
                if n < 0 and errno == EINTR:
                    continue
                return
            self.receive_batches += 1
            for i in range(n):
                buf = self.rx_bufs + <size_t>i * BUF_SIZE
                length = self.rx_msgs[i].msg_len
                if self.rx_msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
                    self.udp_received_packets += 1
                    self.drops_in[V_TRUNCATED] += 1
                    continue
                # The sender's peer entry, looked up once for every datagram of a GRO run.
                if v6:
                    peer = self.routes.find_peer6(self.rx_addr[i].sin6_addr.s6_addr)
                else:
                    peer = self.routes.find_peer(ntohl((<sockaddr_in*>&self.rx_addr[i]).sin_addr.s_addr))
                seg = 0
                if self.gro:
                    c = CMSG_FIRSTHDR(&self.rx_msgs[i].msg_hdr)
                    while c != NULL:
                        if c.cmsg_level == SOL_UDP and c.cmsg_type == UDP_GRO:
                            seg = (<int*>CMSG_DATA(c))[0]
                        c = CMSG_NXTHDR(&self.rx_msgs[i].msg_hdr, c)
                if seg <= 0 or seg >= length:
                    self._deliver(buf, length, peer)
                    continue
                self.gro_receives += 1
                offset = 0
                while offset < length:  # a GRO run: datagrams of seg bytes, the last possibly shorter
                    piece = seg if length - offset > seg else length - offset
                    self._deliver(buf + offset, piece, peer)
                    offset += piece
            self._flush_coalesced()  # the receive buffers are reused by the next recvmmsg
            if n < want:
                return

    cdef void _deliver(self, uint8_t* buf, Py_ssize_t length, int32_t peer) noexcept nogil:
        """One datagram's payload from the peer with index `peer` (-1: no lease's address): check, TTL-1, count, then
        write it to the TUN (or hold it to glue)."""
        cdef int verdict
        cdef Peer* p
        self.udp_received_packets += 1
        verdict = classify_inbound(buf, length, peer, self.routes, &self.own, self.protect)
        if verdict == V_OK:
            verdict = decrement_hops(buf)
        if verdict != V_OK:
            self.drops_in[verdict] += 1
            return
        if peer >= 0:
            p = &self.routes.peers[peer]
            p.rx_packets += 1
            p.rx_bytes += length
        if self.vnet_hdr:
            if tcp_segment_continues(&self.co, buf, length):
                coalescer_append(&self.co, buf, length)
                self.co_iov[self.co.count].iov_base = buf + self.co.hlen
                self.co_iov[self.co.count].iov_len = length - self.co.hlen
                return
            self._flush_coalesced()
            if tcp_segment_can_start(buf, length):
                coalescer_start(&self.co, buf, length)
                self.co_iov[1].iov_base = buf
                self.co_iov[1].iov_len = length
                return
        if self._tun_write(buf, length) != length:
            self.drops_in[V_TUN_WRITE_FAILED] += 1
            return
        self.tun_written_packets += 1
        self.tun_written_bytes += length

    cdef void _flush_coalesced(self) noexcept nogil:
        """Write the held TCP segments as one packet with a virtio GSO header (or the lone one as it is)."""
        cdef int count = self.co.count
        cdef Py_ssize_t expected
        if count == 0:
            return
        coalescer_finish(&self.co, self.vnet_out)
        self.co.count = 0
        expected = VNET_HDR_LEN + self.co.total
        self.tun_writes += 1
        if writev(self.tun_fd, self.co_iov, count + 1) != expected:
            self.drops_in[V_TUN_WRITE_FAILED] += count
            return
        if count > 1:
            self.coalesced_writes += 1
        self.tun_written_packets += count
        self.tun_written_bytes += self.co.total + (count - 1) * self.co.hlen  # as the segments arrived

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
            "gso_sends": self.gso_sends,
            "gro_receives": self.gro_receives,
            "tso_reads": self.tso_reads,
            "tso_segments": self.tso_segments,
            "tun_writes": self.tun_writes,
            "coalesced_writes": self.coalesced_writes,
            "drops_tun_to_udp": {VERDICT_NAMES[i]: self.drops_out[i] for i in range(1, V_COUNT) if self.drops_out[i]},
            "drops_udp_to_tun": {VERDICT_NAMES[i]: self.drops_in[i] for i in range(1, V_COUNT) if self.drops_in[i]},
        }
