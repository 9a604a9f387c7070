# cython: language_level=3
"""The TUN side of the udp data plane (see tun.pxd).

deliver() (inline, in tun.pxd) is the one write path for received packets: without offloads a plain write; with them,
consecutive segments of one TCP flow are held (pointers into the caller's receive buffers, nothing copied) and written
as one packet with a virtio GSO header by flush(), which the caller runs before it reuses those buffers.
"""
from libc.errno cimport EINTR, errno
from libc.string cimport memset

from posix.unistd cimport read as read_fd, write as write_fd

from _fastpath.clib cimport writev
from _fastpath.offload cimport coalescer_finish


cdef class TunSide:
    def __cinit__(self, int fd, bint vnet_hdr=False):
        self.fd = fd
        self.vnet_hdr = vnet_hdr
        self.co.count = 0
        memset(self.vnet_zero, 0, VNET_HDR_LEN)
        self.co_iov[0].iov_base = self.vnet_out
        self.co_iov[0].iov_len = VNET_HDR_LEN

    cdef Py_ssize_t read(self, uint8_t* buf, Py_ssize_t size) noexcept nogil:
        """One read (a packet, or with offloads a virtio header and a packet); < 0 when there is none."""
        cdef Py_ssize_t r
        while True:
            r = read_fd(self.fd, buf, size)
            if r < 0 and errno == EINTR:
                continue
            return r

    cdef Py_ssize_t write(self, uint8_t* pkt, Py_ssize_t length) noexcept nogil:
        """One complete packet (behind an all-zero virtio header when offloads are on); the packet bytes written."""
        cdef iovec parts[2]
        cdef Py_ssize_t r
        self.writes += 1
        if not self.vnet_hdr:
            return write_fd(self.fd, pkt, length)
        parts[0].iov_base = self.vnet_zero
        parts[0].iov_len = VNET_HDR_LEN
        parts[1].iov_base = pkt
        parts[1].iov_len = length
        r = writev(self.fd, parts, 2)
        return r - VNET_HDR_LEN if r >= VNET_HDR_LEN else -1

    cdef void flush(self) noexcept nogil:
        """Write the held TCP segments as one packet with a virtio GSO header (or the lone one as it is)."""
        cdef int count = self.co.count
        cdef Py_ssize_t expected
        if count == 0:
            return
        coalescer_finish(&self.co, self.vnet_out)
        self.co.count = 0
        expected = VNET_HDR_LEN + self.co.total
        self.writes += 1
        if writev(self.fd, self.co_iov, count + 1) != expected:
            self.write_failed += count
            return
        if count > 1:
            self.coalesced_writes += 1
        self.written_packets += count
        self.written_bytes += self.co.total + (count - 1) * self.co.hlen  # as the segments arrived

    # -- Python face, for tests: the real write path on any fd --------------------------------------------------------
    def deliver_all(self, packets):
        """deliver() each packet (kept in one buffer, as a receive batch would be), then flush(); returns
        (writes, packets written, write failures) of this call."""
        data = bytearray(b"".join(packets))
        cdef unsigned char[:] view = data
        cdef Py_ssize_t offset = 0, length
        cdef uint64_t writes = self.writes, written = self.written_packets, failed = self.write_failed
        for packet in packets:
            length = len(packet)
            deliver(self, &view[offset] if length else <uint8_t*>NULL, length)
            offset += length
        self.flush()
        return self.writes - writes, self.written_packets - written, self.write_failed - failed
