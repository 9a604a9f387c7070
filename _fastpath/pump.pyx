# cython: language_level=3
"""The udp backend's data plane: moves packets TUN <-> UDP in batches, without the GIL and without Python objects.

Three parts, as wireguard-go draws them: the TUN side (tun.pyx: reads, writes, gluing received TCP segments), the UDP
side (udp.pyx: sendmmsg with UDP GSO runs and its fallback, recvmmsg with the GRO split), and this loop between them,
which keeps read -> check -> route -> send.

The pump runs in a thread of its own (run(stop_fd)): a poll() loop over the fds that never takes the GIL, so no
control-plane work in the interpreter (lease watches, netlink, SQLite, metrics, garbage collection) can delay a packet;
a lone packet leaves at once, batches form only from what is already queued. Each wake-up drains a ready fd until
EAGAIN or until DEFAULT_BURST datagrams (so one direction cannot starve the other; readiness is level-triggered, the
rest comes next round): a TUN read of a TSO super-packet counts as the segments it becomes and a GRO receive as the
datagrams it holds, so a round is bounded in work (tens of microseconds), not in reads. on_tun_readable and
on_socket_readable drain one side in such rounds for callers that drive the pump themselves (tests).
Lease events change the route table under its write lock; each pump holds it for reading for one round at a time and
lets go of it while a full socket buffer makes a send wait.

Several pumps (the udp backend's -udp-workers) each own one queue of a multi-queue flannel0 and one receiving socket of
a SO_REUSEPORT group, and send from a source port of their own; the kernel steers each flow to one pump in each
direction (flannel_udp/net/steering.py), so they share only the route table and the peers' counters.

TUN -> UDP: read packets one by one (the TUN has no batch read), check, route, TTL-1, queue on the UDP side, send per
batch. With TUN offloads a read may be a 64 KB TCP or UDP super-packet: it is routed and checked once, then cut into
standalone MTU-sized packets (offload.pxd) without copying: each segment is two iovecs, its rewritten headers and its
payload where the read left it, so every read buffer of a batch stays untouched until the batch is sent.
UDP -> TUN: receive a batch, check each datagram (sender is a lease's PublicIP, inner source in its subnet, inner
destination in ours), TTL-1, and hand it to the TUN side, which writes it or glues it to its flow's previous segments.
"""
from libc.stdlib cimport calloc, free

from _fastpath.clib cimport *
from _fastpath.loop cimport PacketLoop
from _fastpath.offload cimport *
from _fastpath.packet cimport *
from _fastpath.routes cimport Peer, RouteTable
from _fastpath.tun cimport TunSide, deliver
from _fastpath.udp cimport BUF_SIZE, GRO_BATCH, UdpSide, queue

from _fastpath.packet import VERDICT_NAMES

cdef enum:
    DEFAULT_BURST = BATCH  # datagrams per round before the other direction gets its turn


cdef class Pump(PacketLoop):
    def __cinit__(self, int tun_fd, int sock_fd, RouteTable routes, own_subnet, bint protect=True,
                  int burst=DEFAULT_BURST, bint gso=False, bint gro=False, bint vnet_hdr=False, int sock6_fd=-1,
                  own_subnet6=None, int notify_fd=-1, int send_fd=-1, int send6_fd=-1):
        self.tun = TunSide(tun_fd, vnet_hdr)
        self.udp = UdpSide(sock_fd, sock6_fd, gso, gro, notify_fd, send_fd, send6_fd)
        self.routes = routes
        self.own = own_subnets(own_subnet, own_subnet6)  # with the TUN's addresses, the sources of ICMP errors
        self.protect = protect
        self.burst = burst
        self.tx_bufs = <uint8_t*>calloc(BATCH, BUF_SIZE)
        if self.tx_bufs == NULL:
            raise MemoryError()
        cdef int i
        for i in range(BATCH):
            self.tx_buf[i] = self.tx_bufs + <size_t>i * BUF_SIZE

    def __dealloc__(self):
        free(self.tx_bufs)

    cdef void _tun_round(self) noexcept nogil:
        self.tun_wakeups += 1
        self.routes.lock()
        self._tun_to_udp()
        self.routes.unlock()

    cdef void _socket_round(self, int fd, bint v6) noexcept nogil:
        self.socket_wakeups += 1
        self.routes.lock()
        self._udp_to_tun(fd, v6)
        self.routes.unlock()

    # -- TUN -> UDP --------------------------------------------------------------------------------------------------
    cdef void _tun_to_udp(self) noexcept nogil:
        cdef int handled = 0, n = 0, reads = 0, verdict, i
        cdef Py_ssize_t r, length, payload, offset
        cdef int32_t peer
        cdef uint8_t* buf
        cdef uint8_t* pkt
        while handled < self.burst:
            # Buffers 0..reads-1 hold packets queued in this batch; a read that is dropped leaves its buffer free.
            buf = self.tx_buf[reads]
            r = self.tun.read(buf, BUF_SIZE)
            if r < 0:
                break  # EAGAIN, or an error that the next readiness will show again
            self.tun_read_packets += 1
            pkt = buf
            length = r
            self.plan.gso_type = VNET_GSO_NONE
            self.plan.segments = 1
            if self.tun.vnet_hdr:
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
            self.udp.send(n, self.routes)

    cdef int _queue(self, int n, uint8_t* head, Py_ssize_t head_len, uint8_t* payload, Py_ssize_t payload_len,
                    int32_t peer) noexcept nogil:
        """Queue a datagram in slot n; send the batch when the slots are full. Returns the next free slot."""
        if not queue(self.udp, n, head, head_len, payload, payload_len, peer):
            return n + 1
        self.udp.send(BATCH, self.routes)
        return 0

    cdef void _answer_unreachable(self, const uint8_t* pkt, Py_ssize_t length) noexcept nogil:
        cdef Py_ssize_t reply
        if (pkt[0] >> 4) == 6:
            reply = build_no_route6(pkt, length, self.own.addr6, self.icmp_buf)
        else:
            reply = build_net_unreachable(pkt, length, self.own.addr4, self.icmp_buf)
        if reply > 0 and self.tun.write(self.icmp_buf, reply) == reply:
            self.icmp_sent += 1

    # -- UDP -> TUN --------------------------------------------------------------------------------------------------
    cdef void _udp_to_tun(self, int fd, bint v6) noexcept nogil:
        cdef int n, i
        cdef uint8_t* buf
        cdef Py_ssize_t length, offset, seg, piece
        cdef int32_t peer
        cdef uint64_t start = self.udp_received_packets  # datagrams, each datagram of a GRO run counted
        cdef int want = GRO_BATCH if self.udp.gro else BATCH
        while self.udp_received_packets - start < <uint64_t>self.burst:
            n = self.udp.receive(fd, v6)
            if n <= 0:
                return
            for i in range(n):
                buf = self.udp.received(i)
                if buf == NULL:
                    self.udp_received_packets += 1
                    self.drops_in[V_TRUNCATED] += 1
                    continue
                length = self.udp.rx_msgs[i].msg_len
                peer = self.udp.sender(i, v6, self.routes)  # once for every datagram of a GRO run
                seg = self.udp.gro_size(i)
                if seg == 0:
                    self._deliver(buf, length, peer)
                    continue
                offset = 0
                while offset < length:  # a GRO run: datagrams of seg bytes, the last possibly shorter
                    piece = seg if length - offset > seg else length - offset
                    self._deliver(buf + offset, piece, peer)
                    offset += piece
            self.tun.flush()  # the receive buffers are reused by the next receive
            if n < want:
                return

    cdef void _deliver(self, uint8_t* buf, Py_ssize_t length, int32_t peer) noexcept nogil:
        """One datagram's payload from the peer with index `peer` (-1: no lease's address): check, TTL-1, count, then
        to the TUN side."""
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
            counter_add(&p.rx_packets, 1)
            counter_add(&p.rx_bytes, length)
        deliver(self.tun, buf, length)

    def counters(self):
        """Totals and drops by reason and direction, for /metrics and tests."""
        drops_out = {VERDICT_NAMES[i]: self.drops_out[i] for i in range(1, V_COUNT) if self.drops_out[i]}
        drops_in = {VERDICT_NAMES[i]: self.drops_in[i] for i in range(1, V_COUNT) if self.drops_in[i]}
        counters = self.side_counters(drops_out, drops_in)
        counters.update(icmp_unreachable_sent=self.icmp_sent, tun_wakeups=self.tun_wakeups,
                        socket_wakeups=self.socket_wakeups)
        return counters
