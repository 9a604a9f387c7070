"""The UDP side of the udp data plane: the underlay sockets (one per family), sendmmsg with UDP GSO runs and the GSO
fallback, recvmmsg with the UDP GRO split."""
from libc.stdint cimport int32_t, uint8_t, uint64_t

from _fastpath.clib cimport iovec, mmsghdr, sockaddr_in6
from _fastpath.routes cimport RouteTable


cdef enum:
    BATCH = 64  # datagrams per sendmmsg / messages per recvmmsg
    GRO_BATCH = 8  # messages per receive with UDP GRO: each may hold a run of up to 64 KB of datagrams
    BUF_SIZE = 65536 + 64  # any IP packet (IPv6: 40 + 65535) plus a virtio header: never truncated silently
    SEND_WAIT_MS = 20  # how long a full socket buffer may hold a batch before its rest is dropped
    GSO_MAX_SEGMENTS = 64  # the kernel's limit (UDP_MAX_SEGMENTS) on older kernels
    GSO_MAX_BYTES = 65000  # payload of one UDP datagram before segmentation: < 65535 - IP - UDP headers
    CTRL_WORDS = 4  # 32 bytes, 8-aligned: room for one cmsg with an int


cdef inline int gso_run_end(const size_t* lengths, const int32_t* peers, int first, int n, bint gso) noexcept nogil:
    """Where the run of datagrams that one send carries ends (the index after it), starting at `first` of n: with GSO
    the longest run for the same peer whose datagrams all have the first one's size except a shorter last one, within
    the kernel's GSO_MAX_SEGMENTS and GSO_MAX_BYTES; without GSO one datagram."""
    cdef int i = first + 1
    cdef size_t seg = lengths[first], total = seg, length
    if not gso:
        return i
    while i < n and peers[i] == peers[first] and i - first < GSO_MAX_SEGMENTS and total + lengths[i] <= GSO_MAX_BYTES:
        length = lengths[i]
        if length > seg:
            break
        total += length
        i += 1
        if length < seg:
            break  # only the last segment may be shorter
    return i


cdef class UdpSide:
    cdef int sock_fd  # the IPv4 underlay's socket (receives; -1 if none)
    cdef int sock6_fd  # the IPv6 underlay's socket, -1 if none
    cdef int send_fd  # where IPv4 datagrams leave: sock_fd, or with several pumps this pump's own source port
    cdef int send6_fd
    cdef public bint gso  # UDP_SEGMENT on sends; turned off for good if the kernel refuses it
    cdef public bint gro  # UDP_GRO on receives (set by the caller after the setsockopt succeeded)
    cdef public int gso_error  # errno that turned GSO off, 0 if none
    cdef int notify_fd  # an eventfd told when GSO is turned off (the control plane logs it at once), -1 if none
    # The batch being sent: slot i is one datagram, as two iovecs (headers or the whole packet, then payload or none).
    cdef iovec tx_iov[2 * BATCH]
    cdef size_t tx_len[BATCH]
    cdef int32_t tx_peer[BATCH]
    cdef mmsghdr gso_msgs[BATCH]  # one per run of datagrams for one peer
    cdef int gso_first[BATCH + 1]  # per message: its first slot
    cdef int gso_family[BATCH]  # per message: 4 or 6, the socket it leaves by
    cdef sockaddr_in6 gso_addr[BATCH]  # per message: its peer's address, copied (the send may let go of the table)
    cdef uint64_t gso_ctrl[BATCH][CTRL_WORDS]
    # The batch received.
    cdef uint8_t* rx_bufs
    cdef mmsghdr rx_msgs[BATCH]
    cdef iovec rx_iov[BATCH]
    cdef sockaddr_in6 rx_addr[BATCH]  # room for a sender of either family
    cdef uint64_t rx_ctrl[BATCH][CTRL_WORDS]
    cdef uint64_t sent_packets, sent_bytes, send_batches, gso_sends, send_failed, receive_batches, gro_receives

    cdef int _message(self, int first, int n, int m, RouteTable routes) noexcept nogil
    cdef void send(self, int n, RouteTable routes) noexcept nogil
    cdef void _notify(self) noexcept nogil
    cdef int receive(self, int fd, bint v6) noexcept nogil
    cdef uint8_t* received(self, int i) noexcept nogil
    cdef int32_t sender(self, int i, bint v6, RouteTable routes) noexcept nogil
    cdef Py_ssize_t gro_size(self, int i) noexcept nogil


cdef inline bint queue(UdpSide udp, int n, uint8_t* head, Py_ssize_t head_len, uint8_t* payload,
                       Py_ssize_t payload_len, int32_t peer) noexcept nogil:
    """Put a datagram for `peer` in slot n, as one piece (payload NULL) or headers + payload (inline: once per
    datagram). True when the slots are full: the caller sends the batch before it queues more."""
    udp.tx_iov[2 * n].iov_base = head
    udp.tx_iov[2 * n].iov_len = head_len
    udp.tx_iov[2 * n + 1].iov_base = payload
    udp.tx_iov[2 * n + 1].iov_len = payload_len
    udp.tx_len[n] = head_len + payload_len
    udp.tx_peer[n] = peer
    return n + 1 == BATCH
